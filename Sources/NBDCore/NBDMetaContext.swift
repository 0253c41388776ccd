/// A metadata context, such as `base:allocation` or `qemu:dirty-bitmap:NAME`
/// ("Metadata querying"), with the id the server gave it.
public struct NBDMetaContext: Hashable, Sendable {
    /// The id the server assigned with `NBD_OPT_SET_META_CONTEXT`; 0 (meaningless) in a list.
    public var id: UInt32
    /// The full name, namespace and leaf, e.g. `base:allocation`.
    public var name: String

    /// A context with its id and name.
    public init(id: UInt32, name: String) {
        self.id = id
        self.name = name
    }

    /// Whether its status is known to have 32 bits: every `base:` context ("all contexts in
    /// the "base:" namespace"), and qemu's (`qemu:dirty-bitmap:*`, `qemu:allocation-depth`).
    public var hasNarrowStatus: Bool { name.hasPrefix("base:") || name.hasPrefix("qemu:") }

    /// The context every server with block status offers.
    public static let baseAllocation = "base:allocation"

    /// The context of qemu's dirty bitmap `name` (`qemu-nbd -B NAME`): `qemu:dirty-bitmap:NAME`.
    /// Bit 0 of an extent's status set means dirty.
    public static func dirtyBitmap(_ name: String) -> String { "qemu:dirty-bitmap:\(name)" }
}
