/// Why a copy, checksum or verification failed, in words for people, with a ``Code`` for
/// programs. Errors of the library's own (`NBDError`, thrown by an export) pass through as
/// they are.
public struct NBDCopyError: Error, Sendable, CustomStringConvertible {
    /// What kind of failure this is. Open-ended: new codes can be added without breaking users.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private let name: String
        private init(_ name: String) { self.name = name }
        /// The code's name.
        public var description: String { name }

        /// An option or argument that cannot work, found before anything was read or written.
        public static let invalidArgument = Code("invalidArgument")
        /// A source and a destination whose sizes do not fit together.
        public static let sizeMismatch = Code("sizeMismatch")
        /// A local file could not be opened, read, written, zeroed or synced.
        public static let fileFailed = Code("fileFailed")
        /// The source ended before its size, or a checksum did not see every byte.
        public static let incomplete = Code("incomplete")
        /// A resumable copy's journal is unreadable, not one of ours, for another copy, or
        /// in use by another copy.
        public static let journal = Code("journal")
        /// The source lacks what was asked of it (a dirty bitmap's metadata context).
        public static let unsupported = Code("unsupported")
        /// The copy does not read back as the source: `--verify` found a difference.
        public static let verificationFailed = Code("verificationFailed")
    }

    public let code: Code
    /// What went wrong, for a person.
    public let message: String

    /// An error with its code and message.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    /// The message alone: what the `nbd` tool prints after `nbd: `.
    public var description: String { message }
}
