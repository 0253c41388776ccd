import NIOCore

/// The server side of the handshake and negotiation phases, without I/O.
///
/// It sends the fixed-newstyle greeting, checks the client flags ("the server MUST close the
/// TCP connection if it does not recognize the client's flags"), and answers every option;
/// unknown options get `NBD_REP_ERR_UNSUP` and negotiation goes on. It holds the rules of the
/// server's TLS mode (``NBDServerTLSMode``): which options are answered before TLS, STARTTLS
/// itself, and what is forgotten once TLS is up.
@_spi(NBDMachines) public struct ServerNegotiationStateMachine: Sendable {
    /// What the server offers for one export.
    public struct Export: Hashable, Sendable {
        public var name: String
        public var description: String
        public var size: UInt64
        public var flags: TransmissionFlags
        public var blockSizes: BlockSizeConstraints
        /// Zeroing is faster than writing zeroes: `NBD_CMD_FLAG_FAST_ZERO` succeeds.
        public var zeroIsFast: Bool
        /// The largest size `NBD_CMD_RESIZE` may ask for (nil: no bound of the export's own).
        /// A client never makes the server allocate more than this.
        public var maximumSize: UInt64?

        /// An export description.
        public init(
            name: String,
            description: String = "",
            size: UInt64,
            flags: TransmissionFlags,
            blockSizes: BlockSizeConstraints,
            zeroIsFast: Bool = false,
            maximumSize: UInt64? = nil
        ) {
            self.name = name
            self.description = description
            self.size = size
            self.flags = flags
            self.blockSizes = blockSizes
            self.zeroIsFast = zeroIsFast
            self.maximumSize = maximumSize
        }

        /// What a server offers for storage with these properties: the one place the
        /// advertised transmission flags and block sizes are decided. Every command is sent
        /// for (FLUSH, FUA and CACHE always; TRIM, WRITE_ZEROES and FAST_ZERO unless
        /// read-only), multi-conn when a flush covers every connection, and block sizes of 1
        /// byte minimum, 4 KiB preferred and `maximumPayload` at most. `NBD_FLAG_SEND_RESIZE`
        /// when resizable (up to `maximumSize`, which must then be given) and not read-only.
        public init(
            serving name: String,
            description: String = "",
            size: UInt64,
            isReadOnly: Bool,
            flushCoversAllConnections: Bool,
            zeroIsFast: Bool,
            resizableUpTo maximumSize: UInt64? = nil,
            maximumPayload: Int
        ) {
            var flags: TransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendCache]
            if isReadOnly {
                flags.insert(.readOnly)
            } else {
                // FAST_ZERO is advertised whatever the storage: a slow zero is then refused with
                // NBD_ENOTSUP at once, which is what the flag asks for.
                flags.formUnion([.sendTrim, .sendWriteZeroes, .sendFastZero])
                if maximumSize != nil { flags.insert(.sendResize) }
            }
            // "NBD_FLAG_CAN_MULTI_CONN: ... the server ... will ensure that ... a flush on one
            // connection covers every connection."
            if flushCoversAllConnections { flags.insert(.canMultiConn) }
            let blockSizes = BlockSizeConstraints(minimum: 1, preferred: 4096, maximum: UInt32(maximumPayload))
            self.init(
                name: name,
                description: description,
                size: size,
                flags: flags,
                blockSizes: blockSizes,
                zeroIsFast: zeroIsFast,
                maximumSize: maximumSize
            )
        }
    }

    /// What was agreed when transmission starts.
    public struct Agreement: Hashable, Sendable {
        public var export: Export
        /// The transmission flags sent, which depend on the format (`NBD_FLAG_SEND_DF`,
        /// `NBD_FLAG_BLOCK_STATUS_PAYLOAD`).
        public var flags: TransmissionFlags
        /// How requests and replies are framed.
        public var format: TransmissionFormat
        /// The metadata contexts selected for this export, by id.
        public var metaContexts: [NBDMetaContext]
        /// Whether replies come as chunks (structured or extended).
        public var structuredReplies: Bool { format.hasChunks }

        /// An agreement with the given terms.
        public init(export: Export, flags: TransmissionFlags, format: TransmissionFormat, metaContexts: [NBDMetaContext]) {
            self.export = export
            self.flags = flags
            self.format = format
            self.metaContexts = metaContexts
        }
    }

    /// What the caller does next.
    public enum Action: Sendable {
        /// More bytes are needed.
        case wait
        /// Send these bytes and go on.
        case send(ByteBuffer)
        /// Send these bytes, then transmission starts.
        case enterTransmission(ByteBuffer, Agreement)
        /// Send these bytes, then close the connection (ABORT, or an export refused to
        /// EXPORT_NAME).
        case close(ByteBuffer)
        /// Send these bytes (STARTTLS's acknowledgement) in clear, then start the TLS handshake;
        /// report its success with ``tlsEstablished()``. No option is read until then.
        case startTLS(ByteBuffer)
        /// The client broke the protocol: close at once, sending nothing more.
        case fatal(NBDError)
    }

    enum State: Sendable { case awaitingClientFlags, negotiating, awaitingTLS, done }

    /// The id of `base:allocation`, the one context this server offers.
    public static let baseAllocationID: UInt32 = 1

    private let exports: [String: Export]
    private let exportOrder: [String]
    private let maximumOptionLength: Int
    private var state = State.awaitingClientFlags
    private var noZeroes = false
    private var format = TransmissionFormat.simple
    private var selected: (export: String, contexts: [NBDMetaContext])?
    private let tlsMode: NBDServerTLSMode
    /// The TLS handshake that followed STARTTLS completed.
    public private(set) var isTLS = false

    /// A machine serving `exports` in `tlsMode`; options longer than `maximumOptionLength`
    /// end the session.
    public init(exports: [Export], maximumOptionLength: Int = 64 * 1024, tlsMode: NBDServerTLSMode = .off) {
        self.exports = Dictionary(exports.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
        self.exportOrder = exports.map(\.name)
        self.maximumOptionLength = maximumOptionLength
        self.tlsMode = tlsMode
    }

    /// The TLS handshake after STARTTLS succeeded: negotiation goes on, over TLS, from scratch.
    public mutating func tlsEstablished() {
        guard state == .awaitingTLS else { return }
        // "When this command succeeds, the server MUST NOT preserve any negotiation state
        // (such as a request for NBD_OPT_STRUCTURED_REPLY, or metadata contexts from
        // NBD_OPT_SET_META_CONTEXT) issued before this command."
        format = .simple
        selected = nil
        isTLS = true
        state = .negotiating
    }

    /// The greeting to send first: fixed newstyle, with NO_ZEROES offered.
    public func greeting() -> ByteBuffer {
        var buffer = ByteBuffer()
        ServerGreeting.newstyle([.fixedNewstyle, .noZeroes]).encode(into: &buffer)
        return buffer
    }

    /// Consumes what it can of `buffer` and says what to do.
    public mutating func receive(_ buffer: inout ByteBuffer) -> Action {
        switch state {
        case .done, .awaitingTLS:
            return .wait
        case .awaitingClientFlags:
            guard let raw = buffer.readInteger(as: UInt32.self) else { return .wait }
            let flags = ClientFlags(rawValue: raw)
            // "the server MUST close the TCP connection if it does not recognize the client's flags"
            guard flags.subtracting([.fixedNewstyle, .noZeroes]).isEmpty else {
                state = .done
                return .fatal(.clientViolation("unknown client flags 0x\(String(raw, radix: 16))"))
            }
            noZeroes = flags.contains(.noZeroes)
            state = .negotiating
            return receive(&buffer)
        case .negotiating:
            let request: OptionRequest?
            do {
                request = try OptionRequest.decode(from: &buffer, maximumLength: maximumOptionLength)
            } catch {
                state = .done
                return .fatal(error)
            }
            guard let request else { return .wait }
            return answer(request)
        }
    }

    private mutating func answer(_ request: OptionRequest) -> Action {
        let code = request.code
        var out = ByteBuffer()
        func reply(_ body: OptionReply.Body) { OptionReply(option: code, body: body).encode(into: &out) }

        if tlsMode == .require, !isTLS {
            switch request {
            case .startTLS, .abort:
                break
            case .exportName:
                // "If the server receives a request to enter transmission mode via
                // NBD_OPT_EXPORT_NAME when TLS has not been initiated, then as this request
                // cannot error, it MUST terminate the session."
                state = .done
                return .close(out)
            default:
                // "If the server receives any other option, including NBD_OPT_INFO and
                // unsupported options, it MUST reply with NBD_REP_ERR_TLS_REQD if TLS has not
                // been initiated."
                reply(.error(.errTLSRequired, message: "this server requires TLS: send NBD_OPT_STARTTLS first"))
                return .send(out)
            }
        }

        switch request {
        case .exportName(let name):
            // "Once extended headers are successfully requested, a client MUST NOT use
            // NBD_OPT_EXPORT_NAME": its reply has no room to say so, so the session ends.
            guard format != .extended else {
                state = .done
                return .fatal(.clientViolation("NBD_OPT_EXPORT_NAME after extended headers were negotiated"))
            }
            guard let export = exports[name] else {
                // "If the server is unwilling to allow the export, it MUST terminate the session."
                state = .done
                return .close(out)
            }
            let agreement = agree(export, entering: true)
            ExportNameReply(size: export.size, flags: agreement.flags).encode(into: &out, noZeroes: noZeroes)
            state = .done
            return .enterTransmission(out, agreement)
        case .abort:
            // "The server MUST reply with NBD_REP_ACK."
            reply(.ack)
            state = .done
            return .close(out)
        case .list:
            for name in exportOrder { reply(.server(name: name, description: exports[name]!.description)) }
            reply(.ack)
        case .info(let name, let requests), .go(let name, let requests):
            guard let export = exports[name] else {
                reply(.error(.errUnknown, message: Self.unknownExport(name)))
                return .send(out)
            }
            let agreement = agree(export, entering: code == .go)
            reply(.info(.export(size: export.size, flags: agreement.flags)))
            if requests.contains(.name) { reply(.info(.name(export.name))) }
            if requests.contains(.description), !export.description.isEmpty { reply(.info(.description(export.description))) }
            if requests.contains(.blockSize) { reply(.info(.blockSize(export.blockSizes))) }
            reply(.ack)
            if code == .go {
                state = .done
                return .enterTransmission(out, agreement)
            }
        case .structuredReply:
            switch format {
            case .extended:
                // "NBD_REP_ERR_EXT_HEADER_REQD: The client has already successfully negotiated
                // extended headers, which takes precedence over this option."
                reply(.error(.errExtendedHeaderRequired, message: "extended headers are on, and take precedence"))
            case .structured:
                reply(.error(.errInvalid, message: "structured replies are already on"))
            case .simple:
                format = .structured
                reply(.ack)
            }
        case .extendedHeaders:
            if format == .extended {
                reply(.error(.errInvalid, message: "extended headers are already on"))
            } else {
                format = .extended
                reply(.ack)
            }
        case .listMetaContext(let name, let queries), .setMetaContext(let name, let queries):
            let isSet = code == .setMetaContext
            if isSet { selected = nil }
            guard format.hasChunks else {
                // "This option SHOULD NOT be requested unless structured replies or extended
                // headers have been negotiated first."
                reply(.error(.errInvalid, message: "negotiate structured replies or extended headers first"))
                return .send(out)
            }
            guard exports[name] != nil else {
                reply(.error(.errUnknown, message: Self.unknownExport(name)))
                return .send(out)
            }
            let matches =
                queries.isEmpty ? !isSet : queries.contains { $0 == NBDMetaContext.baseAllocation.name || (!isSet && $0 == "base:") }
            var contexts: [NBDMetaContext] = []
            if matches {
                contexts = [NBDMetaContext(id: isSet ? Self.baseAllocationID : 0, name: NBDMetaContext.baseAllocation.name)]
                reply(.metaContext(id: contexts[0].id, name: contexts[0].name))
            }
            if isSet { selected = (name, contexts) }
            reply(.ack)
        case .startTLS:
            guard tlsMode != .off else {
                // NOTLS: "it MUST respond with ... NBD_REP_ERR_UNSUP (if it does not support
                // the NBD_OPT_STARTTLS option at all)".
                reply(.error(.errUnsupported, message: "this server does not offer TLS"))
                return .send(out)
            }
            guard !isTLS else {
                // "If the server receives NBD_OPT_STARTTLS when TLS has already been
                // negotiated, it MUST reply with NBD_REP_ERR_INVALID."
                reply(.error(.errInvalid, message: "TLS is already on"))
                return .send(out)
            }
            // "If the server receives NBD_OPT_STARTTLS prior to negotiating TLS, it MUST reply
            // with NBD_REP_ACK"; "After an NBD_REP_ACK reply has been sent, the server MUST be
            // prepared for a TLS handshake, and all further data MUST be sent and received
            // over TLS."
            reply(.ack)
            state = .awaitingTLS
            return .startTLS(out)
        case .other:
            reply(.error(.errUnsupported, message: "\(code) is not supported"))
        }
        return .send(out)
    }

    /// The terms for `export`; `entering` for GO and EXPORT_NAME, which start transmission.
    private func agree(_ export: Export, entering: Bool) -> Agreement {
        var flags = export.flags.union(.hasFlags)
        // "MUST leave this flag clear if structured replies have not been negotiated."
        if format.hasChunks { flags.insert(.sendDF) } else { flags.remove(.sendDF) }
        let contexts = selected?.export == export.name && format.hasChunks ? selected!.contexts : []
        // "Servers MUST NOT advertise this bit unless the client successfully negotiates
        // extended headers ..., and SHOULD NOT advertise this bit in response to NBD_OPT_GO if
        // the client does not negotiate metacontexts."
        // INFO says what the export can do once contexts are chosen, as qemu does.
        if format == .extended, !contexts.isEmpty || !entering {
            flags.insert(.blockStatusPayload)
        } else {
            flags.remove(.blockStatusPayload)
        }
        return Agreement(export: export, flags: flags, format: format, metaContexts: contexts)
    }

    /// What a client is told about an export name the server does not serve.
    static func unknownExport(_ name: String) -> String {
        name.isEmpty ? "there is no default export" : "no export named \"\(name)\""
    }
}
