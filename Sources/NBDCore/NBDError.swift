/// The one error type of the library.
///
/// It says what failed (``code`` and ``message``), carries what the server said when it said
/// anything (``serverErrno`` for a command, ``optionReply`` for an option, ``serverMessage``),
/// and tells whether the connection can still be used (``connectionUsable``): a server error on
/// one command fails that command only; a protocol violation or a lost connection fails every
/// request in flight and closes the connection.
public struct NBDError: Error, Sendable, CustomStringConvertible {
    /// What kind of failure this is. Open-ended: new codes can be added without breaking users.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private let name: String
        private init(_ name: String) { self.name = name }
        /// The code's name.
        public var description: String { name }

        /// The server failed a command with an NBD error value (see ``NBDError/serverErrno``).
        public static let serverError = Code("serverError")
        /// The server refused an option with an `NBD_REP_ERR_*` reply (see ``NBDError/optionReply``).
        public static let optionRejected = Code("optionRejected")
        /// The server broke a MUST of the protocol; the connection was closed.
        public static let protocolViolation = Code("protocolViolation")
        /// The connection closed or failed after it was made, or was closed by this client.
        public static let connectionClosed = Code("connectionClosed")
        /// No connection could be made: nothing listens there, the name does not resolve, or
        /// nothing answered in time. Apart from ``connectionClosed``, so that a retry policy can
        /// tell a server that is away from one lost in the middle of requests.
        public static let connectFailed = Code("connectFailed")
        /// `NBDClient` gave up: the server stayed away for longer than its reconnect delay. The
        /// message says how long it tried, how often, and the last cause.
        public static let unavailable = Code("unavailable")
        /// A connection of `NBDClient` found another export than the first one did: another
        /// size, flags, framing or metadata contexts (a server restarted with another disk).
        /// Nothing more is sent.
        public static let exportChanged = Code("exportChanged")
        /// The peer is no server this client can use: oldstyle, non-fixed newstyle, or not NBD.
        public static let incompatibleServer = Code("incompatibleServer")
        /// The server requires TLS, or the caller asked for TLS and the server refused it.
        public static let tlsRequired = Code("tlsRequired")
        /// The TLS handshake failed: an untrusted or expired certificate, a wrong name, ...
        public static let tlsFailed = Code("tlsFailed")
        /// The export did not advertise what was asked (a command or flag); nothing was sent.
        public static let notAdvertised = Code("notAdvertised")
        /// The caller asked for something invalid (range, alignment, flags); nothing was sent.
        public static let invalidArgument = Code("invalidArgument")
        /// An NBD URI could not be parsed.
        public static let invalidURI = Code("invalidURI")
        /// The server did not answer within the configured time.
        public static let timedOut = Code("timedOut")
        /// A flush of `NBDClient` with its replay window off, after a reconnection: writes
        /// the server answered before it went away, and had not yet been asked to flush, may be
        /// lost. The message names the byte ranges in doubt; the next flush succeeds as usual.
        public static let writesInDoubt = Code("writesInDoubt")
    }

    /// What kind of failure this is.
    public let code: Code
    /// A sentence saying what failed.
    public let message: String
    /// The server's error value for a failed command, by POSIX name.
    public let serverErrno: NBDErrno?
    /// The server's `NBD_REP_ERR_*` reply for a refused option.
    public let optionReply: OptionReplyType?
    /// The text the server sent with its error, if any.
    public let serverMessage: String?
    /// True when the connection can still be used after this error.
    public let connectionUsable: Bool
    /// The error underneath, for example the socket error.
    public let underlying: (any Error & Sendable)?

    /// Makes an error; the library makes these, tests and servers may too.
    public init(
        _ code: Code,
        _ message: String,
        serverErrno: NBDErrno? = nil,
        optionReply: OptionReplyType? = nil,
        serverMessage: String? = nil,
        connectionUsable: Bool,
        underlying: (any Error & Sendable)? = nil
    ) {
        self.code = code
        self.message = message
        self.serverErrno = serverErrno
        self.optionReply = optionReply
        self.serverMessage = serverMessage
        self.connectionUsable = connectionUsable
        self.underlying = underlying
    }

    /// The message, with the server's error value, reply and text when there are any.
    public var description: String {
        var text = message
        if let serverErrno { text += " (\(serverErrno.posixName): \(serverErrno.explanation))" }
        if let optionReply { text += " (\(optionReply))" }
        if let serverMessage, !serverMessage.isEmpty { text += ": server says \"\(serverMessage)\"" }
        if let underlying { text += ": \(underlying)" }
        return text
    }
}

extension NBDError {
    /// A MUST of the protocol the server broke: the connection cannot be trusted any more.
    public static func serverViolation(_ message: String) -> NBDError {
        NBDError(.protocolViolation, "protocol violation by the server: \(message)", connectionUsable: false)
    }

    /// A MUST of the protocol the client broke (what a server reports before it hangs up).
    public static func clientViolation(_ message: String) -> NBDError {
        NBDError(.protocolViolation, "protocol violation by the client: \(message)", connectionUsable: false)
    }

    /// A request refused before anything was sent.
    public static func invalidArgument(_ message: String) -> NBDError {
        NBDError(.invalidArgument, message, connectionUsable: true)
    }

    /// A request for something the export did not advertise; nothing was sent.
    public static func unsupported(_ message: String) -> NBDError {
        NBDError(.notAdvertised, message, connectionUsable: true)
    }
}
