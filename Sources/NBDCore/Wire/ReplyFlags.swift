/// Flags of a structured reply chunk ("Structured reply flags").
@_spi(NBDMachines) public struct ReplyFlags: OptionSet, Hashable, Sendable {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    /// `NBD_REPLY_FLAG_DONE`: the last chunk of a reply.
    public static let done = ReplyFlags(rawValue: 1 << 0)
}
