/// Flags of a structured reply chunk ("Structured reply flags").
package struct ReplyFlags: OptionSet, Hashable, Sendable {
    package var rawValue: UInt16
    package init(rawValue: UInt16) { self.rawValue = rawValue }

    /// `NBD_REPLY_FLAG_DONE`: the last chunk of a reply.
    package static let done = ReplyFlags(rawValue: 1 << 0)
}
