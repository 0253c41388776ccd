import NIOCore

/// The client side of the handshake and negotiation phases, without I/O.
///
/// Feed it the server's bytes with ``receive(_:)`` and tell it which option was sent with
/// ``optionSent(_:)``; it returns what to do next. A server that breaks the protocol gets
/// ``Action/fatal(_:)``, and the machine accepts nothing more. It enforces the order the spec sets ("The
/// client MUST NOT send any option until it has received a final reply to any option it has
/// sent") and checks each reply against the option it answers.
@_spi(NBDMachines) public struct ClientNegotiationStateMachine: Sendable {
    /// Bounds on what a server may send while negotiating.
    public struct Limits: Hashable, Sendable {
        /// Largest single option reply accepted.
        public var maximumReplyLength: Int
        /// Largest total of the replies to one option (for example a long `NBD_OPT_LIST`).
        public var maximumRepliesLength: Int
        /// Bounds of these sizes (the defaults otherwise).
        public init(maximumReplyLength: Int = OptionReply.defaultMaximumLength, maximumRepliesLength: Int = 16 << 20) {
            self.maximumReplyLength = maximumReplyLength
            self.maximumRepliesLength = maximumRepliesLength
        }
    }

    /// What the caller does next.
    public enum Action: Equatable, Sendable {
        /// More bytes are needed.
        case wait
        /// The greeting was accepted: send these client flags (32 bits).
        case sendClientFlags(ClientFlags)
        /// The final reply to an option arrived; every reply to it, in order, last one final.
        case optionCompleted(OptionCode, [OptionReply.Body])
        /// The server answered `NBD_OPT_EXPORT_NAME`: transmission starts.
        case exportNameAccepted(ExportNameReply)
        /// The server broke the protocol, or is not a server this client can use: close the
        /// connection (hard disconnect).
        case fatal(NBDError)

        public static func == (lhs: Action, rhs: Action) -> Bool {
            switch (lhs, rhs) {
            case (.wait, .wait): true
            case (.sendClientFlags(let a), .sendClientFlags(let b)): a == b
            case (.optionCompleted(let a, let x), .optionCompleted(let b, let y)): a == b && x == y
            case (.exportNameAccepted(let a), .exportNameAccepted(let b)): a == b
            case (.fatal(let a), .fatal(let b)): a.code == b.code && a.message == b.message
            default: false
            }
        }
    }

    enum State: Hashable, Sendable {
        case awaitingGreeting
        case ready
        case awaitingReplies(OptionCode, [OptionReply.Body], bytes: Int)
        case awaitingExportName
        case transmission
        case closed
        case failed
    }

    private(set) var state: State = .awaitingGreeting
    /// The handshake flags the server sent.
    public private(set) var serverFlags: HandshakeFlags = []
    /// The client flags sent back.
    public private(set) var clientFlags: ClientFlags = []
    private let limits: Limits

    /// A machine waiting for the server's greeting.
    public init(limits: Limits = Limits()) {
        self.limits = limits
    }

    /// True once GO or EXPORT_NAME succeeded.
    public var isInTransmission: Bool { state == .transmission }

    /// True when an option can be sent now.
    public var canSendOption: Bool { state == .ready }

    /// What the options negotiated so far mean for the transmission phase.
    public struct Negotiated: Hashable, Sendable {
        /// How transmission is framed: extended once `NBD_OPT_EXTENDED_HEADERS` was
        /// acknowledged, structured once `NBD_OPT_STRUCTURED_REPLY` was.
        public var format = TransmissionFormat.simple
        /// Whether replies come as chunks.
        public var structuredReplies: Bool { format.hasChunks }
        /// The contexts the last `NBD_OPT_SET_META_CONTEXT` selected, and for which export.
        public var metaContexts: [NBDMetaContext] = []
        /// The export the last `NBD_OPT_SET_META_CONTEXT` named.
        public var metaContextExport: String?
        /// The export named by the last INFO, GO or EXPORT_NAME.
        public var export: String?
    }

    /// What has been negotiated so far.
    public private(set) var negotiated = Negotiated()

    /// The metadata contexts usable in transmission: the spec allows `NBD_CMD_BLOCK_STATUS` only
    /// when the final `NBD_OPT_SET_META_CONTEXT` "referred to the same export name that was
    /// ultimately selected for transmission phase".
    public var transmissionMetaContexts: [NBDMetaContext] {
        guard negotiated.structuredReplies, negotiated.metaContextExport == negotiated.export else { return [] }
        return negotiated.metaContexts
    }

    /// Records that `request` is about to be sent.
    public mutating func optionSent(_ request: OptionRequest) throws(NBDError) {
        let option = request.code
        guard state == .ready else {
            throw .invalidArgument("cannot send \(option) now: the previous option has no final reply yet or negotiation is over")
        }
        // "Once extended headers are successfully requested, a client MUST NOT use NBD_OPT_EXPORT_NAME."
        if option == .exportName, negotiated.format == .extended {
            throw .invalidArgument("cannot send NBD_OPT_EXPORT_NAME once extended headers are negotiated; use NBD_OPT_GO")
        }
        switch request {
        case .exportName(let name): negotiated.export = name
        case .go(let name, _): negotiated.export = name
        case .setMetaContext(let name, _):
            // "Issuing this command replaces all previously-set metadata contexts (including when this command fails)"
            negotiated.metaContexts = []
            negotiated.metaContextExport = name
        default: break
        }
        state = option == .exportName ? .awaitingExportName : .awaitingReplies(option, [], bytes: 0)
    }

    private mutating func record(_ replies: [OptionReply.Body], for option: OptionCode) {
        guard case .ack = replies.last else { return }
        switch option {
        case .structuredReply:
            negotiated.format = max(negotiated.format, .structured)
        case .extendedHeaders:
            // "When successful, this option takes precedence over structured replies."
            negotiated.format = .extended
        case .setMetaContext:
            negotiated.metaContexts = replies.compactMap {
                if case .metaContext(let id, let name) = $0 { NBDMetaContext(id: id, name: name) } else { nil }
            }
        case .startTLS:
            // "the server MUST NOT preserve any negotiation state ... issued before this command"
            negotiated = Negotiated()
        default:
            break
        }
    }

    /// Marks the machine closed (ABORT sent, or the connection lost).
    public mutating func close() { state = .closed }

    /// Consumes what it can of `buffer` and says what to do.
    public mutating func receive(_ buffer: inout ByteBuffer) -> Action {
        guard state != .failed else { return .wait }
        do {
            return try step(&buffer)
        } catch {
            state = .failed
            return .fatal(error)
        }
    }

    private mutating func step(_ buffer: inout ByteBuffer) throws(NBDError) -> Action {
        switch state {
        case .awaitingGreeting:
            guard let greeting = try ServerGreeting.decode(from: &buffer) else { return .wait }
            guard case .newstyle(let flags) = greeting else {
                throw NBDError(
                    .incompatibleServer,
                    "the server speaks oldstyle negotiation, which this client does not support (it needs fixed newstyle)",
                    connectionUsable: false
                )
            }
            guard flags.contains(.fixedNewstyle) else {
                throw NBDError(
                    .incompatibleServer,
                    "the server speaks non-fixed newstyle negotiation, which this client does not support (it needs fixed newstyle)",
                    connectionUsable: false
                )
            }
            serverFlags = flags
            // "NBD_FLAG_C_NO_ZEROES ... MUST NOT be set if the server did not set NBD_FLAG_NO_ZEROES."
            clientFlags = flags.contains(.noZeroes) ? [.fixedNewstyle, .noZeroes] : [.fixedNewstyle]
            state = .ready
            return .sendClientFlags(clientFlags)

        case .awaitingReplies(let option, var replies, let bytes):
            let before = buffer.readableBytes
            guard let reply = try OptionReply.decode(from: &buffer, maximumLength: limits.maximumReplyLength) else { return .wait }
            let total = bytes + (before - buffer.readableBytes)
            guard reply.option == option else {
                throw .serverViolation("reply to \(reply.option) while waiting for a reply to \(option)")
            }
            guard total <= limits.maximumRepliesLength else {
                throw .serverViolation("replies to \(option) exceed \(limits.maximumRepliesLength) bytes")
            }
            try Self.check(reply.body, answers: option, earlier: replies)
            if option == .go, negotiated.format == .extended, case .error(.errUnsupported, _) = reply.body {
                // "if the server has acknowledged a client's request for NBD_OPT_EXTENDED_HEADERS,
                // the server MUST NOT fail NBD_OPT_GO with NBD_REP_ERR_UNSUP"
                throw .serverViolation("NBD_OPT_GO refused as unsupported after extended headers were acknowledged")
            }
            if case .info(.export(let size, _)) = reply.body { try Self.checkSize(size) }
            replies.append(reply.body)
            switch reply.body {
            case .ack:
                state = option == .go ? .transmission : .ready
                record(replies, for: option)
                return .optionCompleted(option, replies)
            case .error:
                state = .ready
                return .optionCompleted(option, replies)
            case .server, .info, .metaContext:
                state = .awaitingReplies(option, replies, bytes: total)
                return try step(&buffer)
            }

        case .awaitingExportName:
            guard let reply = ExportNameReply.decode(from: &buffer, noZeroes: clientFlags.contains(.noZeroes)) else { return .wait }
            try Self.checkSize(reply.size)
            state = .transmission
            return .exportNameAccepted(reply)

        case .ready, .transmission, .closed, .failed:
            // Nothing is expected: the server speaks out of turn. In transmission the bytes
            // belong to the transmission machine, which the caller hands them to.
            if buffer.readableBytes == 0 || state == .transmission { return .wait }
            throw .serverViolation("unexpected \(buffer.readableBytes) bytes while no option is pending")
        }
    }

    /// An export of 2^63 bytes or more cannot be used: its offsets do not fit the signed 64-bit
    /// offsets of files (`off_t`), and offset + length could wrap. Checked here, once, so that
    /// no later sum or conversion of a size, offset or extent can trap.
    private static func checkSize(_ size: UInt64) throws(NBDError) {
        guard size <= UInt64(Int64.max) else {
            throw NBDError(
                .incompatibleServer,
                "the server announces an export of \(size) bytes, 2^63 or more, which this client cannot address",
                connectionUsable: false
            )
        }
    }

    /// Which replies may answer which option ("Option types", "Option reply types").
    private static func check(_ body: OptionReply.Body, answers option: OptionCode, earlier: [OptionReply.Body]) throws(NBDError) {
        switch body {
        case .ack, .error:
            if case .ack = body, option == .info || option == .go {
                // "the server MUST send at least one NBD_REP_INFO, with an NBD_INFO_EXPORT information type"
                let hasExport = earlier.contains { reply in
                    if case .info(.export) = reply { return true }
                    return false
                }
                guard hasExport else { throw .serverViolation("\(option) acknowledged without NBD_INFO_EXPORT") }
            }
        case .server:
            guard option == .list else { throw .serverViolation("NBD_REP_SERVER in reply to \(option)") }
        case .info:
            guard option == .info || option == .go else { throw .serverViolation("NBD_REP_INFO in reply to \(option)") }
        case .metaContext:
            guard option == .listMetaContext || option == .setMetaContext else {
                throw .serverViolation("NBD_REP_META_CONTEXT in reply to \(option)")
            }
        }
    }
}
