/// One block status descriptor: an extent's length and its status flags, whose meaning
/// depends on the metadata context. Both are 32 bits on the wire unless extended headers are
/// in use (`NBD_REPLY_TYPE_BLOCK_STATUS_EXT`).
public struct BlockDescriptor: Hashable, Sendable {
    /// Length of the extent in bytes (MUST be nonzero).
    public var length: UInt64
    /// Status flags, meaning set by the metadata context.
    public var flags: UInt64
    /// A descriptor with the given length and flags.
    public init(length: UInt64, flags: UInt64) {
        self.length = length
        self.flags = flags
    }
}
