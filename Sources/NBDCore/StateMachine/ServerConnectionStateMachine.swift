import NIOCore

/// One client connection of a server, without I/O: ``ServerNegotiationStateMachine`` until GO
/// or EXPORT_NAME, then ``ServerTransmissionStateMachine``. The channel handler feeds it events
/// and performs the actions ``next()`` returns, and nothing else.
///
/// Negotiation has a deadline: a client that has not entered transmission within the handshake
/// timeout is closed, so that silent connections cannot hold the server's slots. The deadline
/// covers a TLS handshake too. Once TLS is up, the client's identity must be on the allow-list,
/// when there is one.
@_spi(NBDMachines) public struct ServerConnectionStateMachine: Sendable {
    /// What the caller does next.
    public enum Action: Sendable {
        /// Write these buffers in order, then flush; report with ``bytesWritten(_:)`` once written.
        case write([ByteBuffer])
        /// Write these bytes, then close the connection.
        case writeAndClose(ByteBuffer)
        /// Write these bytes in clear and flush them, then start TLS on the connection: every
        /// byte after them, both ways, is TLS. Report the handshake with
        /// ``tlsEstablished(identity:)``; a failed one ends the connection.
        case startTLS(ByteBuffer)
        /// Transmission starts with `agreement`: requests for its export follow.
        case transmissionStarted(ServerNegotiationStateMachine.Agreement)
        /// Make the backend call `operation` for this request, and report the result with
        /// ``requestCompleted(_:_:)``.
        case perform(RequestHeader, ServerOperation)
        /// Stop reading from the client (see ``ServerTransmissionStateMachine``).
        case pauseReading
        /// Read from the client again.
        case resumeReading
        /// Ask the server's memory budget for this many bytes more; report with
        /// ``memoryGranted()`` (see ``ServerTransmissionStateMachine``).
        case reserveMemory(Int)
        /// Tell the server's memory budget the connection holds this many bytes more (fewer,
        /// when negative). Comes after the connection ended too, as its memory is freed.
        case adjustMemory(by: Int)
        /// Call ``timerFired()`` after this long, replacing any timer armed before.
        case armTimer(after: TimeAmount)
        /// The timer armed last is not needed any more.
        case cancelTimer
        /// The session is over: close the connection.
        case close
        /// The client broke the protocol: close at once, sending nothing more.
        case fatal(NBDError)
    }

    private enum Phase: Sendable {
        case negotiating(ServerNegotiationStateMachine)
        /// Kept after the connection ends, which the child knows: requests still in flight
        /// return their memory to the budget as they end.
        case transmission(ServerTransmissionStateMachine)
        case ended
        /// A child is being changed in place (so that its storage is not shared, and not
        /// copied); never seen between two events.
        case modifying
    }

    private var phase: Phase
    /// The client's bytes not yet taken by the negotiation.
    private var input = ByteBuffer()
    private let limits: ServerTransmissionStateMachine.Limits
    private let handshakeTimeout: TimeAmount
    private var outbox = Outbox<Action>()
    /// Bytes of negotiation writes not yet reported written: written in order, they are paid
    /// off before any of transmission.
    private var negotiationUnwritten = 0

    /// A connection that will serve `exports` within `limits`, closed if it has not entered
    /// transmission within `handshakeTimeout`.
    private let allowedIdentities: Set<String>?

    /// A connection that will serve `exports` within `limits`, closed if it has not entered
    /// transmission within `handshakeTimeout`. With `tlsMode` other than `.off`, clients may
    /// (or must) start TLS; with `allowedIdentities`, only clients whose TLS identity (an X.509
    /// subject or a PSK user name) is in it are served, and so TLS is required whatever
    /// `tlsMode` says: a client in clear has no identity to check.
    public init(
        exports: [ServerNegotiationStateMachine.Export],
        maximumOptionLength: Int,
        limits: ServerTransmissionStateMachine.Limits,
        handshakeTimeout: TimeAmount = .seconds(10),
        tlsMode: NBDServerTLSMode = .off,
        allowedIdentities: Set<String>? = nil
    ) {
        // Fails closed: an allow-list under `.off` too refuses every client in clear.
        let mode = allowedIdentities != nil ? .require : tlsMode
        phase = .negotiating(ServerNegotiationStateMachine(exports: exports, maximumOptionLength: maximumOptionLength, tlsMode: mode))
        self.limits = limits
        self.handshakeTimeout = handshakeTimeout
        self.allowedIdentities = allowedIdentities
    }

    /// The TLS handshake that ``Action/startTLS(_:)`` began completed; `identity` is the
    /// client's X.509 subject or PSK user name, when it has one. Negotiation goes on over TLS,
    /// unless the allow-list refuses the identity.
    public mutating func tlsEstablished(identity: String?) {
        guard case .negotiating(var negotiation) = phase else { return }
        if let allowedIdentities, !allowedIdentities.contains(identity ?? "") {
            phase = .ended
            let who = identity.map { "\"\($0)\"" } ?? "without an identity"
            outbox.replaceAll(with: .fatal(NBDError(.tlsFailed, "the client \(who) is not on the TLS allow-list", connectionUsable: false)))
            return
        }
        phase = .modifying
        negotiation.tlsEstablished()
        phase = .negotiating(negotiation)
    }

    /// The client connected: the greeting goes first, and the handshake deadline starts.
    public mutating func channelActive() {
        guard case .negotiating(let negotiation) = phase else { return }
        outbox.append(negotiationWrite(negotiation.greeting()))
        outbox.append(.armTimer(after: handshakeTimeout))
    }

    /// The buffers of a ``Action/write(_:)`` of `count` bytes in all were written.
    public mutating func bytesWritten(_ count: Int) {
        let paid = min(count, negotiationUnwritten)
        negotiationUnwritten -= paid
        guard count > paid, case .transmission(var transmission) = phase else { return }
        phase = .modifying
        transmission.bytesWritten(count - paid)
        phase = .transmission(transmission)
    }

    /// The channel became writable or stopped being so.
    public mutating func writabilityChanged(_ isWritable: Bool) {
        guard case .transmission(var transmission) = phase else { return }
        phase = .modifying
        transmission.writabilityChanged(isWritable)
        phase = .transmission(transmission)
    }

    /// The timer of the last ``Action/armTimer(after:)`` went off.
    public mutating func timerFired() {
        switch phase {
        case .negotiating:
            phase = .ended
            let message = "the client did not finish negotiating within \(handshakeTimeout.secondsText)"
            outbox.replaceAll(with: .fatal(NBDError(.timedOut, message, connectionUsable: false)))
        case .transmission(var transmission):
            phase = .modifying
            transmission.timerFired()
            phase = .transmission(transmission)
        case .ended, .modifying:
            break
        }
    }

    private mutating func negotiationWrite(_ bytes: ByteBuffer) -> Action {
        negotiationUnwritten += bytes.readableBytes
        return .write([bytes])
    }

    /// Bytes from the client; follow with ``next()``.
    public mutating func bytesReceived(_ bytes: ByteBuffer) {
        switch phase {
        case .negotiating:
            input.appendReceived(bytes)
        case .transmission(var transmission):
            phase = .modifying
            transmission.bytesReceived(bytes)
            phase = .transmission(transmission)
        case .ended, .modifying:
            break
        }
    }

    /// The export's size changed (a resize made on another connection): requests are checked
    /// against `size` from now on.
    public mutating func exportSizeChanged(to size: UInt64) {
        guard case .transmission(var transmission) = phase, transmission.exportSize != size else { return }
        phase = .modifying
        transmission.exportSizeChanged(to: size)
        phase = .transmission(transmission)
    }

    /// The memory of the last ``Action/reserveMemory(_:)`` is the connection's.
    public mutating func memoryGranted() {
        guard case .transmission(var transmission) = phase else { return }
        phase = .modifying
        transmission.memoryGranted()
        phase = .transmission(transmission)
    }

    /// A request handed out by ``Action/perform(_:_:)`` finished with `reply`.
    public mutating func requestCompleted(_ request: RequestHeader, _ reply: ServerReply) {
        guard case .transmission(var transmission) = phase else { return }
        phase = .modifying
        transmission.requestCompleted(request, reply)
        phase = .transmission(transmission)
    }

    /// The server is stopping: a connection still negotiating closes now; one in transmission
    /// answers what is in flight, refuses new requests with `NBD_ESHUTDOWN`, then closes.
    public mutating func shutdownRequested() {
        switch phase {
        case .negotiating:
            phase = .ended
            outbox.replaceAll(with: .close)
        case .transmission(var transmission):
            phase = .modifying
            transmission.shutdownRequested()
            phase = .transmission(transmission)
        case .ended, .modifying:
            break
        }
    }

    /// The connection is gone: nothing more is sent.
    public mutating func channelClosed() {
        if case .transmission(var transmission) = phase {
            phase = .modifying
            transmission.channelClosed()
            phase = .transmission(transmission)
        } else {
            phase = .ended
        }
        outbox.removeAll()
        input = ByteBuffer()
    }

    /// The next thing to do, or nil until the next event.
    public mutating func next() -> Action? {
        if let action = outbox.next() { return action }
        switch phase {
        case .negotiating(var negotiation):
            phase = .modifying
            let action = negotiation.receive(&input)
            phase = .negotiating(negotiation)
            switch action {
            case .wait:
                input.releaseIfRead()
                return nil
            case .send(let bytes):
                return negotiationWrite(bytes)
            case .close(let bytes):
                phase = .ended
                return .writeAndClose(bytes)
            case .startTLS(let bytes):
                // Bytes the client sent behind STARTTLS, before its TLS handshake, were sent in
                // clear: read as options after the handshake, they would be an attacker's
                // (the STARTTLS command injection of CVE-2021-3716, in nbdkit).
                guard input.readableBytes == 0 else {
                    phase = .ended
                    return .fatal(.clientViolation("\(input.readableBytes) bytes followed NBD_OPT_STARTTLS before the TLS handshake"))
                }
                negotiationUnwritten += bytes.readableBytes
                return .startTLS(bytes)
            case .fatal(let error):
                phase = .ended
                return .fatal(error)
            case .enterTransmission(let bytes, let agreement):
                var transmission = ServerTransmissionStateMachine(agreement: agreement, limits: limits)
                // Requests sent right behind GO are in the same bytes.
                if input.readableBytes > 0 { transmission.bytesReceived(input) }
                input = ByteBuffer()
                phase = .transmission(transmission)
                outbox.append(.cancelTimer)
                outbox.append(.transmissionStarted(agreement))
                return negotiationWrite(bytes)
            }
        case .transmission(var transmission):
            phase = .modifying
            let action = transmission.next()
            phase = .transmission(transmission)
            switch action {
            case .perform(let request, let operation): return .perform(request, operation)
            case .write(let buffers): return .write(buffers)
            case .pauseReading: return .pauseReading
            case .resumeReading: return .resumeReading
            case .reserveMemory(let amount): return .reserveMemory(amount)
            case .adjustMemory(let delta): return .adjustMemory(by: delta)
            case .armTimer(let after): return .armTimer(after: after)
            case .cancelTimer: return .cancelTimer
            // The child has ended itself, and stays for what its requests still hold.
            case .close: return .close
            case .fatal(let error): return .fatal(error)
            case nil: return nil
            }
        case .ended, .modifying:
            return nil
        }
    }
}
