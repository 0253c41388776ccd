/// A metadata context, such as `base:allocation` or `qemu:dirty-bitmap:NAME`
/// ("Metadata querying"): what a configuration asks for, and what a connection negotiated.
///
/// A context is known by its name: two values with the same name are equal whatever their
/// ids, because the id is only the number one connection's server gave it (another connection
/// to the same export may get another). Write one as a string literal, or with
/// ``baseAllocation`` and ``dirtyBitmap(_:)``.
public struct NBDMetaContext: Hashable, Sendable, ExpressibleByStringLiteral {
    /// The full name, namespace and leaf, e.g. `base:allocation`.
    public var name: String
    /// The id the server assigned with `NBD_OPT_SET_META_CONTEXT` on one connection; 0 in a
    /// configuration and in the answer to `NBD_OPT_LIST_META_CONTEXT`.
    public var id: UInt32

    /// The context called `name`, not negotiated yet.
    public init(_ name: String) {
        self.init(id: 0, name: name)
    }

    /// A context with the id a server gave it.
    public init(id: UInt32, name: String) {
        self.id = id
        self.name = name
    }

    /// A context written as a literal: `"qemu:allocation-depth"`.
    public init(stringLiteral name: String) {
        self.init(name)
    }

    /// Whether its status is known to have 32 bits: every `base:` context ("all contexts in
    /// the "base:" namespace"), and qemu's (`qemu:dirty-bitmap:*`, `qemu:allocation-depth`).
    public var hasNarrowStatus: Bool { name.hasPrefix("base:") || name.hasPrefix("qemu:") }

    /// The context every server with block status offers.
    public static let baseAllocation = NBDMetaContext("base:allocation")

    /// qemu's `qemu:allocation-depth`: which layer of a backing chain holds each extent.
    public static let allocationDepth = NBDMetaContext("qemu:allocation-depth")

    /// The context of qemu's dirty bitmap `bitmap` (`qemu-nbd -B NAME`): `qemu:dirty-bitmap:NAME`.
    /// Bit 0 of an extent's status set means dirty.
    public static func dirtyBitmap(_ bitmap: String) -> NBDMetaContext { NBDMetaContext("qemu:dirty-bitmap:\(bitmap)") }

    /// Whether this is one of qemu's dirty bitmaps.
    public var isDirtyBitmap: Bool { name.hasPrefix("qemu:dirty-bitmap:") }

    /// Equal names: the ids are each connection's own.
    public static func == (lhs: NBDMetaContext, rhs: NBDMetaContext) -> Bool { lhs.name == rhs.name }

    /// Hashes the name only, as ``==(_:_:)`` compares.
    public func hash(into hasher: inout Hasher) { hasher.combine(name) }
}
