@_spi(NBDMachines) import NBDCore

/// The answer to `NBD_CMD_BLOCK_STATUS`: for each negotiated metadata context, consecutive
/// extents starting at the requested offset ("Metadata querying").
public struct NBDBlockStatus: Hashable, Sendable {
    /// Where the first extent of every context starts.
    public var offset: UInt64
    /// Extents by context name.
    public var contexts: [String: [NBDExtent]]

    /// A status with the given extents.
    public init(offset: UInt64, contexts: [String: [NBDExtent]]) {
        self.offset = offset
        self.contexts = contexts
    }

    /// The extents of one context, e.g. `status[.baseAllocation]` or `status["base:allocation"]`.
    public subscript(context: NBDMetaContext) -> [NBDExtent]? { contexts[context.name] }

    init(offset: UInt64, descriptors: [UInt32: [BlockDescriptor]], metaContexts: [NBDMetaContext]) {
        var contexts: [String: [NBDExtent]] = [:]
        for context in metaContexts {
            guard let list = descriptors[context.id] else { continue }
            var position = offset
            contexts[context.name] = list.map { descriptor in
                defer { position += descriptor.length }
                return NBDExtent(offset: position, length: descriptor.length, flags: descriptor.flags, context: context)
            }
        }
        self.init(offset: offset, contexts: contexts)
    }
}

/// One extent of a metadata context, its flags decoded by what the context means.
public struct NBDExtent: Hashable, Sendable {
    /// Where the extent starts in the export.
    public var offset: UInt64
    /// Length of the extent in bytes.
    public var length: UInt64
    /// The raw status flags (64 bits with extended headers; `base:` and `qemu:` contexts use
    /// the low 32).
    public var flags: UInt64
    /// The flags decoded according to the context they came from.
    public var status: Status

    /// The bytes the extent covers.
    public var range: Range<UInt64> { offset..<offset + length }

    /// An extent whose flags are decoded for `context`.
    public init(offset: UInt64, length: UInt64, flags: UInt64, context: NBDMetaContext) {
        self.offset = offset
        self.length = length
        self.flags = flags
        self.status = Status(flags: flags, context: context)
    }

    /// What an extent's flags mean in the contexts this library knows.
    public enum Status: Hashable, Sendable {
        /// `base:allocation`: `NBD_STATE_HOLE` and `NBD_STATE_ZERO`.
        case allocation(BaseAllocation)
        /// `qemu:dirty-bitmap:NAME`: bit 0 set means dirty.
        case dirtyBitmap(dirty: Bool)
        /// `qemu:allocation-depth`: 0 unallocated, 1 in the top layer, n in the n-th backing layer.
        case allocationDepth(UInt32)
        /// Any other context: the raw flags.
        case other(UInt64)

        /// The flags decoded; the client has checked that the narrow contexts' flags fit 32 bits.
        init(flags: UInt64, context: NBDMetaContext) {
            let narrow = UInt32(truncatingIfNeeded: flags)
            if context == .baseAllocation {
                self = .allocation(BaseAllocation(rawValue: narrow))
            } else if context.isDirtyBitmap {
                self = .dirtyBitmap(dirty: flags & 1 != 0)
            } else if context == .allocationDepth {
                self = .allocationDepth(narrow)
            } else {
                self = .other(flags)
            }
        }
    }

    /// The flags of `base:allocation` ("`base:allocation` metadata context").
    public struct BaseAllocation: OptionSet, Hashable, Sendable {
        public var rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        /// `NBD_STATE_HOLE`: not allocated.
        public static let hole = BaseAllocation(rawValue: 1 << 0)
        /// `NBD_STATE_ZERO`: reads as zeroes.
        public static let zero = BaseAllocation(rawValue: 1 << 1)
    }
}

extension NBDExtent: CustomStringConvertible {
    /// E.g. `0..<65536: hole, zero`.
    public var description: String { "\(offset)..<\(offset + length): \(status)" }
}

extension NBDExtent.Status: CustomStringConvertible {
    /// What the flags mean in their context: `data`, `hole, zero`, `dirty`, `depth 1`, ...
    public var description: String {
        switch self {
        case .allocation(let flags): flags.description
        case .dirtyBitmap(let dirty): dirty ? "dirty" : "clean"
        case .allocationDepth(let depth): depth == 0 ? "unallocated" : "depth \(depth)"
        case .other(let flags): "flags 0x\(String(flags, radix: 16))"
        }
    }
}

extension NBDExtent.BaseAllocation: CustomStringConvertible {
    /// `data` (allocated, not known to be zero), or the flags by name: `hole, zero`.
    public var description: String {
        rawValue == 0 ? "data" : flagNames(rawValue, [(Self.hole.rawValue, "hole"), (Self.zero.rawValue, "zero")], separator: ", ")
    }
}
