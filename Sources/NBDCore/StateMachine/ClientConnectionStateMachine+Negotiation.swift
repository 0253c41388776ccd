import NIOCore

// Negotiation and TLS: options one at a time, the TLS policy, the deadlines of each step, and
// the start of transmission.
extension ClientConnectionStateMachine {
    /// A caller sends an option (EXPORT_NAME included); `waiter` gets its replies, or
    /// ``ClientConnectionOutcome/transmissionStarted(_:)`` for GO and EXPORT_NAME.
    public mutating func optionRequested(_ option: OptionRequest, waiter: Waiter) {
        switch phase {
        case .closed(let error):
            outbox.append(.fail(waiter, error))
        case .transmission, .modifying:
            outbox.append(.fail(waiter, .invalidArgument("cannot send \(option.code): negotiation is over")))
        case .negotiating(let state):
            guard case .none = state.pending, !disconnecting else {
                outbox.append(.fail(waiter, .invalidArgument("cannot send \(option.code) now: the previous option has no final reply yet")))
                return
            }
            send(option, pending: .option(option, waiter))
        }
    }

    /// The TLS handshake completed.
    public mutating func tlsEstablished(version: String?, cipherSuite: String?) {
        guard case .negotiating(var state) = phase, case .tlsHandshake? = state.pending else { return }
        tlsVersion = version
        tlsCipherSuite = cipherSuite
        disarm()
        state.pending = nil
        phase = .negotiating(state)
        answerHandshake()
    }

    /// A negotiation deadline passed (the request clock is `+Clock`'s).
    mutating func negotiationTimerFired() {
        guard let deadline else { return }
        self.deadline = nil
        if case .negotiating(let state) = phase, case .abort? = state.pending {
            // The server did not acknowledge ABORT in time: close all the same.
            aborted()
            return
        }
        fail(NBDError(.timedOut, "\(deadline) within \(configuration.negotiationTimeout.secondsText)", connectionUsable: false))
    }

    /// Sends `option`, waiting for `pending`.
    mutating func send(_ option: OptionRequest, pending: Pending) {
        guard case .negotiating(var state) = phase else { return }
        do {
            try state.machine.optionSent(option)
        } catch {
            if case .option(_, let waiter) = pending { outbox.append(.fail(waiter, error)) }
            return
        }
        state.pending = pending
        phase = .negotiating(state)
        var buffer = ByteBuffer()
        option.encode(into: &buffer)
        outbox.append(.write(buffer))
        arm("the server did not answer \(option.code)")
    }

    mutating func arm(_ what: String) {
        deadline = what
        outbox.append(.armTimer(after: configuration.negotiationTimeout))
    }

    mutating func disarm() {
        guard deadline != nil else { return }
        deadline = nil
        outbox.append(.cancelTimer)
    }

    mutating func answerHandshake() {
        guard let waiter = handshakeWaiter, case .negotiating(let state) = phase else { return }
        handshakeWaiter = nil
        outbox.append(.succeed(waiter, .connected(state.machine.serverFlags)))
    }

    /// What is pending while negotiating, set to `pending`.
    mutating func setPending(_ pending: Pending?) {
        guard case .negotiating(var state) = phase else { return }
        state.pending = pending
        phase = .negotiating(state)
    }

    /// Parses what the server sent while negotiating, one step after another.
    @usableFromInline mutating func negotiate() {
        while case .negotiating(var state) = phase {
            let action = state.machine.receive(&state.input)
            if case .wait = action { state.input.releaseIfRead() }
            phase = .negotiating(state)
            switch action {
            case .wait:
                return
            case .fatal(let error):
                fail(error)
                return
            case .sendClientFlags(let flags):
                disarm()
                var buffer = ByteBuffer()
                buffer.writeInteger(flags.rawValue)
                outbox.append(.write(buffer))
                setPending(nil)
                if configuration.tlsPolicy == .disable {
                    answerHandshake()
                } else {
                    send(.startTLS, pending: .startTLS)
                }
            case .exportNameAccepted(let reply):
                disarm()
                startTransmission(.exportName(reply), pending: state.pending)
                return
            case .optionCompleted(let option, let replies):
                disarm()
                completed(option, replies, pending: state.pending)
            }
        }
    }

    mutating func completed(_ option: OptionCode, _ replies: [OptionReply.Body], pending: Pending?) {
        setPending(nil)
        switch pending {
        case .startTLS:
            startedTLS(replies.last)
        case .abort:
            aborted()
        case .option(let request, let waiter):
            if case .error(let type, let message) = replies.last {
                if type == .errUnsupported, case .go(let name, _) = request {
                    // "A client thus SHOULD use NBD_OPT_GO in preference to NBD_OPT_EXPORT_NAME
                    // but SHOULD fall back to NBD_OPT_EXPORT_NAME if NBD_OPT_GO is not supported."
                    send(.exportName(name), pending: .option(.exportName(name), waiter))
                    return
                }
                outbox.append(.fail(waiter, Self.rejection(of: option, type, message)))
                if type == .errShutdown {
                    // "If the client receives NBD_REP_ERR_SHUTDOWN it MUST initiate a soft disconnect."
                    disconnectRequested(waiter: nil)
                }
            } else if option == .go {
                startTransmission(.go(replies), pending: pending)
            } else {
                outbox.append(.succeed(waiter, .optionReplies(replies)))
            }
        case .greeting, .tlsHandshake, nil:
            break
        }
    }

    /// ABORT was answered, or not in time: "This MUST be followed by the client shutting down
    /// TLS (if it is running), and the client dropping the connection."
    mutating func aborted() {
        disarm()
        phase = .closed(NBDError(.connectionClosed, "the negotiation was ended (NBD_OPT_ABORT)", connectionUsable: false))
        outbox.append(.close)
    }

    mutating func startedTLS(_ reply: OptionReply.Body?) {
        guard case .error(let type, let message) = reply else {
            // Bytes after the ACK in clear would be read as if they came over TLS: an injection.
            guard case .negotiating(let state) = phase, state.input.readableBytes == 0 else {
                fail(.serverViolation("bytes sent in clear after the STARTTLS acknowledgement"))
                return
            }
            setPending(.tlsHandshake)
            outbox.append(.startTLS)
            arm("the TLS handshake did not complete")
            return
        }
        if configuration.tlsPolicy == .allow && [.errUnsupported, .errPolicy, .errPlatform].contains(type) {
            // The server has no TLS: under .allow the connection goes on in clear.
            answerHandshake()
            return
        }
        // "If encryption cannot be negotiated then the connection MUST fail": a hard
        // disconnect, with nothing else sent in clear.
        fail(
            NBDError(
                .tlsRequired,
                "the server refused STARTTLS and TLS is required; nothing else was sent",
                optionReply: type,
                serverMessage: message,
                connectionUsable: false
            )
        )
    }

    /// How the server let the client into transmission.
    enum TransmissionAnswer {
        /// GO's replies (its `NBD_REP_INFO`s, the final ACK last).
        case go([OptionReply.Body])
        case exportName(ExportNameReply)
    }

    mutating func startTransmission(_ answer: TransmissionAnswer, pending: Pending?) {
        guard case .option(let option, let waiter) = pending, case .negotiating(let negotiating) = phase else { return }
        let info: NBDExportInfo
        do {
            info = try Self.exportInfo(of: option, answer)
        } catch {
            outbox.append(.fail(waiter, error))
            fail(error)
            return
        }
        // The one metadata-context rule: see ClientNegotiationStateMachine.transmissionMetaContexts.
        let start = ClientTransmissionStart(
            format: negotiating.machine.negotiated.format,
            metaContexts: negotiating.machine.transmissionMetaContexts,
            info: info
        )
        var state = Transmitting(
            machine: ClientTransmissionStateMachine(
                configuration: .init(
                    format: start.format,
                    metaContextIDs: Set(start.metaContexts.map(\.id)),
                    narrowStatusContextIDs: Set(start.metaContexts.filter(\.hasNarrowStatus).map(\.id))
                )
            ),
            validator: RequestValidator(export: info, format: start.format, hasMetaContexts: !start.metaContexts.isEmpty)
        )
        // Bytes behind the reply are transmission bytes: the transmission machine judges them.
        if negotiating.input.readableBytes > 0 { state.machine.feed(negotiating.input) }
        phase = .transmission(state)
        outbox.append(.succeed(waiter, .transmissionStarted(start)))
    }

    /// The export GO or EXPORT_NAME opened, as the server described it.
    static func exportInfo(of option: OptionRequest, _ answer: TransmissionAnswer) throws(NBDError) -> NBDExportInfo {
        switch (option, answer) {
        case (.go(let name, _), .go(let replies)):
            return try NBDExportInfo(requestedName: name, replies: replies)
        case (.exportName(let name), .exportName(let reply)):
            return NBDExportInfo(name: name, size: reply.size, flags: reply.flags)
        default:
            throw .serverViolation("transmission started after \(option.code)")
        }
    }

    /// The error for an option the server refused.
    static func rejection(of option: OptionCode, _ type: OptionReplyType, _ message: String) -> NBDError {
        let usable = type != .errShutdown
        if type == .errTLSRequired {
            return NBDError(
                .tlsRequired,
                "the server requires TLS for \(option); use an nbds:// URI",
                optionReply: type,
                serverMessage: message,
                connectionUsable: usable
            )
        }
        return NBDError(
            .optionRejected,
            "the server refused \(option)",
            optionReply: type,
            serverMessage: message,
            connectionUsable: usable
        )
    }
}
