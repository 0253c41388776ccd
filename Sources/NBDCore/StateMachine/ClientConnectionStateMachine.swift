import NIOCore

/// What a caller waiting on a client connection is answered with.
package enum ClientConnectionOutcome: Sendable {
    /// The handshake is done, and TLS too when the policy asked for it.
    case connected(HandshakeFlags)
    /// Every reply to an option, the final `NBD_REP_ACK` last.
    case optionReplies([OptionReply.Body])
    /// GO or EXPORT_NAME succeeded: transmission has started.
    case transmissionStarted(ClientTransmissionStart)
    /// The connection is closed, after a disconnect that was asked for.
    case disconnected
}

/// What transmission starts with, as the negotiation left it.
package struct ClientTransmissionStart: Sendable {
    /// GO's replies (its `NBD_REP_INFO`s), or nil after EXPORT_NAME.
    package var goReplies: [OptionReply.Body]?
    /// EXPORT_NAME's answer, or nil after GO.
    package var exportNameReply: ExportNameReply?
    /// How requests and replies are framed.
    package var format: TransmissionFormat
    /// The metadata contexts usable with block status.
    package var metaContexts: [NBDMetaContext]

    /// The export's size the server gave (EXPORT_NAME's answer, or GO's `NBD_INFO_EXPORT`).
    package var exportSize: UInt64? {
        if let exportNameReply { return exportNameReply.size }
        var size: UInt64?
        for case .info(.export(let exportSize, _)) in goReplies ?? [] { size = exportSize }
        return size
    }
}

/// A client connection without I/O, from the greeting to the close: it composes
/// ``ClientNegotiationStateMachine`` and ``ClientTransmissionStateMachine`` and owns every
/// rule between them, as postgres-nio's `ConnectionStateMachine` does.
///
/// It owns the TLS policy (STARTTLS first when TLS is wanted; in clear under `.allow` only when
/// the server says it has no TLS; nothing sent in clear under `.require` once refused), the
/// downgrade rule, the negotiation deadlines, the queue of requests under the in-flight cap,
/// the soft disconnects (`NBD_OPT_ABORT` then close; `NBD_CMD_DISC` once requests in flight
/// are answered; after `NBD_REP_ERR_SHUTDOWN` and `NBD_ESHUTDOWN`), the export's size and the
/// barrier of a resize (see ``requestSubmitted(_:command:flags:offset:length:onlyContexts:)``),
/// and the reason the connection ended.
///
/// Every input is an event (`xxxReceived`, `xxxRequested`, `timerFired`, `tlsEstablished`,
/// `errorCaught`, `channelClosed`); what to do then comes out of ``next()`` until it returns
/// nil. `Request` is the caller's handle of one request (compared by identity); `Waiter` that
/// of one call waiting for an ``ClientConnectionOutcome``.
package struct ClientConnectionStateMachine<Request: AnyObject, Waiter> {
    /// What the connection negotiates and its bounds.
    package struct Configuration: Sendable {
        /// Bounds on what the server may send while negotiating.
        package var limits: ClientNegotiationStateMachine.Limits
        /// Requests on the wire at once; more wait in a queue.
        package var maximumRequestsInFlight: Int
        /// How long the server may take to answer each negotiation step.
        package var negotiationTimeout: TimeAmount
        /// Whether TLS is negotiated right after the handshake.
        package var tlsPolicy: NBDTLSPolicy
        /// How long a request on the wire may wait for its reply; nil for ever. Past it the
        /// connection is closed hard (its state is unknown) and every request fails with
        /// ``NBDError/Code/timedOut``.
        package var requestTimeout: TimeAmount?

        /// A configuration with the given settings.
        package init(
            limits: ClientNegotiationStateMachine.Limits = .init(),
            maximumRequestsInFlight: Int = 64,
            negotiationTimeout: TimeAmount = .seconds(30),
            tlsPolicy: NBDTLSPolicy = .disable,
            requestTimeout: TimeAmount? = nil
        ) {
            self.limits = limits
            self.maximumRequestsInFlight = max(1, maximumRequestsInFlight)
            self.negotiationTimeout = negotiationTimeout
            self.tlsPolicy = tlsPolicy
            self.requestTimeout = requestTimeout.map { max($0, .milliseconds(1)) }
        }

        /// The request clock's period: requests are stamped in ticks, and one unanswered for
        /// more than ``ticksPerRequestTimeout`` ticks has timed out, at most one tick late.
        @usableFromInline var tick: TimeAmount {
            guard let requestTimeout else { return .seconds(1) }
            return min(.seconds(1), .nanoseconds(max(1, requestTimeout.nanoseconds / 8)))
        }

        @usableFromInline var ticksPerRequestTimeout: UInt64 {
            guard let requestTimeout else { return .max }
            let tick = self.tick.nanoseconds
            return UInt64((requestTimeout.nanoseconds + tick - 1) / tick)
        }
    }

    /// What the caller does next.
    package enum Action {
        /// Write these bytes (a negotiation message) and flush.
        case write(ByteBuffer)
        /// Write this request header, then the request's payload if any.
        case sendRequest(RequestHeader, Request)
        /// Write `NBD_CMD_DISC`, flush, then close the connection.
        case sendDisconnect(RequestHeader)
        /// Start TLS on the connection now: STARTTLS was acknowledged.
        case startTLS
        /// Arm the one deadline after `after` (replacing any armed one).
        case armTimer(after: TimeAmount)
        /// Cancel the armed deadline.
        case cancelTimer
        /// Answer a waiting caller.
        case succeed(Waiter, ClientConnectionOutcome)
        /// Fail a waiting caller; the connection goes on when `error.connectionUsable`.
        case fail(Waiter, NBDError)
        /// READ data: `bytes` belong at export `offset`.
        case deliverData(Request, offset: UInt64, bytes: ByteBuffer)
        /// A hole in a READ: `length` zero bytes at export `offset`.
        case deliverHole(Request, offset: UInt64, length: UInt32)
        /// The extents of one metadata context for a BLOCK_STATUS.
        case deliverExtents(Request, contextID: UInt32, descriptors: [BlockDescriptor])
        /// The request is finished: successfully when `error` is nil.
        case complete(Request, error: NBDError?)
        /// The caller stopped waiting: answer it with a cancellation now (a request on the
        /// wire stays in the table, and its reply is read and dropped).
        case cancel(Request)
        /// Close the connection, sending nothing more.
        case close
        /// The connection is over with `error`: fail these requests and waiters, and close.
        case closeAndFail(NBDError, requests: [Request], waiters: [Waiter])
    }

    @usableFromInline
    struct Queued {
        @usableFromInline let request: Request
        @usableFromInline let command: CommandType
        @usableFromInline let flags: CommandFlags
        @usableFromInline let offset: UInt64
        @usableFromInline let length: UInt64
        @usableFromInline let onlyContexts: [UInt32]?

        @usableFromInline
        init(request: Request, command: CommandType, flags: CommandFlags, offset: UInt64, length: UInt64, onlyContexts: [UInt32]?) {
            self.request = request
            self.command = command
            self.flags = flags
            self.offset = offset
            self.length = length
            self.onlyContexts = onlyContexts
        }
    }

    /// What the connection waits for while negotiating.
    @usableFromInline
    enum Pending {
        /// The greeting; then the caller of connect, answered once TLS (if any) is up.
        case greeting
        /// STARTTLS's reply, sent on its own under the TLS policy.
        case startTLS
        /// The TLS handshake.
        case tlsHandshake
        /// The final reply to an option a caller sent.
        case option(OptionCode, Waiter)
        /// The reply to the ABORT of a soft disconnect.
        case abort
    }

    @usableFromInline
    enum Phase {
        /// Negotiating; `pending` is what the connection waits for, nil when an option may be sent.
        case negotiating(pending: Pending?)
        case transmission
        case closed(NBDError)
    }

    package let configuration: Configuration
    @usableFromInline var phase: Phase = .negotiating(pending: .greeting)
    @usableFromInline var negotiation: ClientNegotiationStateMachine
    @usableFromInline var transmission: ClientTransmissionStateMachine<Request>
    /// Negotiation bytes not yet parsed (a reply split across reads).
    @usableFromInline var input = ByteBuffer()
    @usableFromInline var handshakeWaiter: Waiter?
    @usableFromInline var queued = CircularBuffer<Queued>()
    /// How many of `queued` are resizes: while none is queued or on the wire, requests go in
    /// order with no look at ranges.
    @usableFromInline var queuedResizes = 0
    /// The resize on the wire: its request, and the sizes before and after.
    @usableFromInline var resizing: (request: Request, from: UInt64, to: UInt64)?
    /// The export's size: the server's, then that of each resize it accepted. Every request
    /// is checked against it as it goes on the wire.
    package var exportSize: UInt64 { size }
    @usableFromInline var size: UInt64 = 0
    @usableFromInline var outbox = CircularBuffer<Action>()
    /// A soft disconnect was asked for (by a caller, or by the server's shutdown).
    @usableFromInline var disconnecting = false
    @usableFromInline var disconnectWaiters: [Waiter] = []
    @usableFromInline var channelIsOpen = true
    /// What the armed deadline waits for, said as the error it becomes.
    @usableFromInline var deadline: String?
    /// The request clock (see ``Configuration/tick``): ticks gone by, and whether it runs,
    /// which it does only while requests are on the wire.
    @usableFromInline var ticks: UInt64 = 0
    @usableFromInline var clockRunning = false
    /// The TLS version agreed, e.g. "tlsv13", once TLS is up.
    package private(set) var tlsVersion: String?
    /// The TLS cipher suite agreed, by its IANA name, once TLS is up.
    package private(set) var tlsCipherSuite: String?

    /// A connection that has just been dialed; `handshakeWaiter` is answered with
    /// ``ClientConnectionOutcome/connected(_:)`` once the handshake (and TLS, when asked) is done.
    package init(configuration: Configuration, handshakeWaiter: Waiter) {
        self.configuration = configuration
        self.negotiation = ClientNegotiationStateMachine(limits: configuration.limits)
        self.transmission = ClientTransmissionStateMachine(configuration: .init(format: .simple))
        self.handshakeWaiter = handshakeWaiter
    }

    // MARK: State

    /// What the negotiation agreed so far.
    package var negotiated: ClientNegotiationStateMachine.Negotiated { negotiation.negotiated }

    /// Whether the connection is in the transmission phase.
    @inlinable package var isInTransmission: Bool { if case .transmission = phase { true } else { false } }

    /// Why the connection ended, once it has.
    package var closedReason: NBDError? { if case .closed(let error) = phase { error } else { nil } }

    /// When the next bytes from the server are READ data: see
    /// ``ClientTransmissionStateMachine/expectedData``. Nil outside transmission.
    @inlinable package var expectedData: (context: Request, offset: UInt64, count: Int, chunkLength: Int)? {
        guard case .transmission = phase else { return nil }
        return transmission.expectedData
    }

    /// Whether the caller may read from the socket itself now (transmission, nothing failed).
    @inlinable package var readsDirectly: Bool {
        guard case .transmission = phase else { return false }
        return !transmission.hasFailed
    }

    /// How requests and replies are framed (simple until transmission starts).
    @inlinable package var format: TransmissionFormat { transmission.configuration.format }

    /// Writes a request header of ``Action/sendRequest(_:_:)`` (or ``Action/sendDisconnect(_:)``)
    /// as the negotiated format frames it, with any payload of its own; a WRITE's data follows.
    @inlinable package func encode(_ header: RequestHeader, into buffer: inout ByteBuffer) {
        transmission.encode(header, into: &buffer)
    }

    /// Bytes fed in transmission and not parsed yet.
    @inlinable package var unparsedByteCount: Int { transmission.unparsedByteCount }

    /// Removes the transmission bytes fed and not parsed yet; see
    /// ``ClientTransmissionStateMachine/takeUnparsed()``.
    @inlinable package mutating func takeUnparsed() -> ByteBuffer { transmission.takeUnparsed() }

    // MARK: Events

    /// The connection is up: the greeting has a deadline.
    package mutating func channelActive() {
        arm("the server sent no NBD greeting")
    }

    /// Bytes from the server.
    @inlinable package mutating func bytesReceived(_ bytes: ByteBuffer) {
        switch phase {
        case .transmission:
            transmission.feed(bytes)
        case .negotiating:
            input.appendReceived(bytes)
            negotiate()
        case .closed:
            break
        }
    }

    /// `count` bytes of the ``expectedData`` were read by the caller, not fed.
    @inlinable package mutating func dataReadDirectly(_ count: Int) {
        transmission.dataReadDirectly(count)
    }

    /// A caller sends an option (EXPORT_NAME included); `waiter` gets its replies, or
    /// ``ClientConnectionOutcome/transmissionStarted(_:)`` for GO and EXPORT_NAME.
    package mutating func optionRequested(_ option: OptionRequest, waiter: Waiter) {
        switch phase {
        case .closed(let error):
            outbox.append(.fail(waiter, error))
        case .transmission:
            outbox.append(.fail(waiter, .invalidArgument("cannot send \(option.code): negotiation is over")))
        case .negotiating(let pending):
            guard case .none = pending, !disconnecting else {
                outbox.append(.fail(waiter, .invalidArgument("cannot send \(option.code) now: the previous option has no final reply yet")))
                return
            }
            send(option, pending: .option(option.code, waiter))
        }
    }

    /// A caller submits a request. It is sent now, or queued while the in-flight cap is reached.
    /// `length` is the length the command acts on; see
    /// ``ClientTransmissionStateMachine/startRequest(_:flags:offset:length:onlyContexts:context:stamp:)``
    /// for `onlyContexts`. A request that runs past the end of the export as it is when the
    /// request would go on the wire completes with an error, unsent.
    ///
    /// `NBD_CMD_RESIZE` (the new size in `offset`) is sent only once no request touching the
    /// bytes between the old and the new size is on the wire, and until its reply such requests
    /// wait (the extension: "Clients MUST NOT issue requests for offsets in the area between the
    /// old and new sizes between the time this request is issued and the reply has been received
    /// ... clients MUST also make sure that no such requests are outstanding when the resize
    /// request is sent"); requests submitted after it wait for it to be sent. The new size
    /// bounds every request after a successful reply.
    @inlinable package mutating func requestSubmitted(
        _ request: Request,
        command: CommandType,
        flags: CommandFlags,
        offset: UInt64,
        length: UInt64,
        onlyContexts: [UInt32]? = nil
    ) {
        switch phase {
        case .closed(let error):
            outbox.append(.complete(request, error: error))
        case .negotiating:
            outbox.append(.complete(request, error: .invalidArgument("\(command) before transmission")))
        case .transmission:
            if disconnecting {
                outbox.append(
                    .complete(request, error: NBDError(.connectionClosed, "the export is disconnecting", connectionUsable: false))
                )
            } else {
                queued.append(
                    Queued(request: request, command: command, flags: flags, offset: offset, length: length, onlyContexts: onlyContexts)
                )
                if command == .resize { queuedResizes += 1 }
                sendQueued()
            }
        }
    }

    /// Another connection to the export resized it (its client made sure nothing was on the
    /// wire here meanwhile): requests are bounded by `newSize` from now on.
    package mutating func exportResizedElsewhere(to newSize: UInt64) {
        guard case .transmission = phase else { return }
        size = newSize
        sendQueued()
    }

    /// The caller of `request` stopped waiting.
    package mutating func requestCancelled(_ request: Request) {
        if let index = queued.firstIndex(where: { $0.request === request }) {
            if queued.remove(at: index).command == .resize { queuedResizes -= 1 }
            // What waited behind a resize may go now.
            sendQueued()
        }
        outbox.append(.cancel(request))
    }

    /// A soft disconnect: `NBD_OPT_ABORT` while negotiating, `NBD_CMD_DISC` once the requests
    /// in flight are answered in transmission. `waiter` (if any) is answered when the
    /// connection has closed.
    package mutating func disconnectRequested(waiter: Waiter?) {
        if case .closed = phase {
            // Answered once the channel has closed, as every disconnect is.
            if let waiter { channelIsOpen ? disconnectWaiters.append(waiter) : outbox.append(.succeed(waiter, .disconnected)) }
            return
        }
        if let waiter { disconnectWaiters.append(waiter) }
        guard !disconnecting else { return }
        disconnecting = true
        switch phase {
        case .negotiating(pending: nil):
            // "The client MAY send NBD_OPT_ABORT ... then close", after the server's ACK.
            send(.abort, pending: .abort)
        case .negotiating:
            // Mid-exchange no option may be sent: the only way out is to close.
            outbox.append(.close)
        case .transmission:
            disconnectIfIdle()
        case .closed:
            break
        }
    }

    /// The armed deadline passed.
    package mutating func timerFired() {
        if case .transmission = phase, clockRunning {
            tickRequestClock()
            return
        }
        guard let deadline else { return }
        self.deadline = nil
        if case .negotiating(pending: .abort) = phase {
            // The server did not acknowledge ABORT in time: close all the same.
            aborted()
            return
        }
        fail(NBDError(.timedOut, "\(deadline) within \(configuration.negotiationTimeout.secondsText)", connectionUsable: false))
    }

    /// The TLS handshake completed.
    package mutating func tlsEstablished(version: String?, cipherSuite: String?) {
        guard case .negotiating(pending: .tlsHandshake) = phase else { return }
        tlsVersion = version
        tlsCipherSuite = cipherSuite
        disarm()
        phase = .negotiating(pending: nil)
        answerHandshake()
    }

    /// The channel reported an error; the connection ends.
    package mutating func errorCaught(_ error: any Error) {
        if case .negotiating(pending: .tlsHandshake) = phase {
            fail(
                NBDError(
                    .tlsFailed,
                    "the TLS handshake failed",
                    connectionUsable: false,
                    underlying: error
                )
            )
        } else {
            fail(NBDError(.connectionClosed, "the connection failed", connectionUsable: false, underlying: error))
        }
    }

    /// The channel closed. Everything still waiting fails with the reason the connection
    /// ended; callers of a disconnect are answered.
    package mutating func channelClosed() {
        channelIsOpen = false
        if case .closed = phase {
        } else {
            end(NBDError(.connectionClosed, "the server closed the connection", connectionUsable: false))
        }
        for waiter in disconnectWaiters { outbox.append(.succeed(waiter, .disconnected)) }
        disconnectWaiters = []
    }

    // MARK: Actions

    /// The next thing to do, or nil until the next event.
    @inlinable package mutating func next() -> Action? {
        if let action = outbox.popFirst() { return action }
        guard case .transmission = phase, let action = transmission.next() else { return nil }
        switch action {
        case .data(let request, let offset, let bytes):
            return .deliverData(request, offset: offset, bytes: bytes)
        case .hole(let request, let offset, let length):
            return .deliverHole(request, offset: offset, length: length)
        case .blockStatus(let request, let id, let descriptors):
            return .deliverExtents(request, contextID: id, descriptors: descriptors)
        case .complete(let request, let error):
            if let resize = resizing, resize.request === request {
                if error == nil { size = resize.to }
                resizing = nil
            }
            if error?.serverErrno == .ESHUTDOWN {
                // "If the client receives an NBD_ESHUTDOWN error it MUST initiate a soft disconnect."
                disconnectRequested(waiter: nil)
            }
            sendQueued()
            disconnectIfIdle()
            return .complete(request, error: error)
        case .fatal(let error, let requests):
            end(error, requests: requests)
            return outbox.popFirst()
        }
    }

    // MARK: Internals

    @inlinable mutating func sendQueued() {
        while transmission.inFlightCount < configuration.maximumRequestsInFlight, !transmission.hasFailed, let next = nextToSend() {
            if next.command != .flush, next.command != .resize, next.offset > exportSize || next.length > exportSize - next.offset {
                outbox.append(.complete(next.request, error: Self.pastTheEnd(next, size: exportSize)))
                continue
            }
            if next.command == .resize {
                queuedResizes -= 1
                resizing = (next.request, exportSize, next.offset)
            }
            let header = transmission.startRequest(
                next.command,
                flags: next.flags,
                offset: next.offset,
                length: next.length,
                onlyContexts: next.onlyContexts,
                context: next.request,
                stamp: ticks
            )
            outbox.append(.sendRequest(header, next.request))
            if configuration.requestTimeout != nil, !clockRunning {
                clockRunning = true
                outbox.append(.armTimer(after: configuration.tick))
            }
        }
    }

    /// The queued request that may go on the wire now, taken out of the queue; nil when none
    /// may. In order, except around a resize: see
    /// ``requestSubmitted(_:command:flags:offset:length:onlyContexts:)``.
    @inlinable mutating func nextToSend() -> Queued? {
        guard resizing != nil || queuedResizes > 0 else { return queued.popFirst() }
        for index in queued.indices {
            let next = queued[index]
            if next.command == .resize {
                // After what was submitted before it, alone, and with nothing on the wire in
                // the bytes it adds or removes.
                guard index == queued.startIndex, resizing == nil else { return nil }
                let zone = min(exportSize, next.offset)..<max(exportSize, next.offset)
                guard !transmission.hasRequestInFlight(touching: zone) else { return nil }
                return queued.remove(at: index)
            }
            if let resize = resizing, next.command != .flush, next.length > 0 {
                let zone = min(resize.from, resize.to)..<max(resize.from, resize.to)
                // Held back until the reply: the range is past one of the two sizes.
                if zone.overlaps(next.offset, length: next.length) { continue }
            }
            return queued.remove(at: index)
        }
        return nil
    }

    /// The error of a request past the end of the export.
    @usableFromInline static func pastTheEnd(_ request: Queued, size: UInt64) -> NBDError {
        .invalidArgument(
            "\(request.command) of \(request.length) bytes at offset \(request.offset) runs past the end of the export (\(size) bytes)"
        )
    }

    /// One tick of the request clock: the oldest request on the wire has had its time, or
    /// the clock goes on while any request is there.
    mutating func tickRequestClock() {
        ticks += 1
        guard let (oldest, stamp) = transmission.oldestInFlight else {
            clockRunning = false
            return
        }
        guard ticks - stamp > configuration.ticksPerRequestTimeout else {
            outbox.append(.armTimer(after: configuration.tick))
            return
        }
        clockRunning = false
        let timeout = (configuration.requestTimeout ?? .zero).secondsText
        let what = "the server did not answer \(oldest.type) at offset \(oldest.offset) within \(timeout)"
        fail(NBDError(.timedOut, what + "; the connection was closed", connectionUsable: false))
    }

    @inlinable mutating func disconnectIfIdle() {
        guard disconnecting, case .transmission = phase, transmission.inFlightCount == 0, queued.isEmpty else { return }
        let header = RequestHeader(type: .disconnect, cookie: 0, offset: 0, length: 0)
        // "A client MUST NOT send anything to the server after sending an NBD_CMD_DISC command."
        phase = .closed(NBDError(.connectionClosed, "the export was disconnected", connectionUsable: false))
        outbox.append(.sendDisconnect(header))
    }

    mutating func send(_ option: OptionRequest, pending: Pending) {
        do {
            try negotiation.optionSent(option)
        } catch {
            if case .option(_, let waiter) = pending { outbox.append(.fail(waiter, error)) }
            return
        }
        phase = .negotiating(pending: pending)
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
        guard let waiter = handshakeWaiter else { return }
        handshakeWaiter = nil
        outbox.append(.succeed(waiter, .connected(negotiation.serverFlags)))
    }

    @usableFromInline mutating func negotiate() {
        while case .negotiating(let pending) = phase {
            let action = negotiation.receive(&input)
            switch action {
            case .wait:
                input.releaseIfRead()
                return
            case .fatal(let error):
                fail(error)
                return
            case .sendClientFlags(let flags):
                disarm()
                var buffer = ByteBuffer()
                buffer.writeInteger(flags.rawValue)
                outbox.append(.write(buffer))
                phase = .negotiating(pending: nil)
                if configuration.tlsPolicy == .disable {
                    answerHandshake()
                } else {
                    send(.startTLS, pending: .startTLS)
                }
            case .exportNameAccepted(let reply):
                disarm()
                startTransmission(goReplies: nil, exportNameReply: reply, pending: pending)
                return
            case .optionCompleted(let option, let replies):
                disarm()
                completed(option, replies, pending: pending)
            }
        }
    }

    mutating func completed(_ option: OptionCode, _ replies: [OptionReply.Body], pending: Pending?) {
        phase = .negotiating(pending: nil)
        switch pending {
        case .startTLS:
            startedTLS(replies.last)
        case .abort:
            aborted()
        case .option(_, let waiter):
            if case .error(let type, let message) = replies.last {
                outbox.append(.fail(waiter, Self.rejection(of: option, type, message)))
                if type == .errShutdown {
                    // "If the client receives NBD_REP_ERR_SHUTDOWN it MUST initiate a soft disconnect."
                    disconnectRequested(waiter: nil)
                }
            } else if option == .go {
                startTransmission(goReplies: replies, exportNameReply: nil, pending: pending)
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
            guard input.readableBytes == 0 else {
                fail(.serverViolation("bytes sent in clear after the STARTTLS acknowledgement"))
                return
            }
            phase = .negotiating(pending: .tlsHandshake)
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

    mutating func startTransmission(goReplies: [OptionReply.Body]?, exportNameReply: ExportNameReply?, pending: Pending?) {
        guard case .option(_, let waiter) = pending else { return }
        // The one metadata-context rule: see ClientNegotiationStateMachine.transmissionMetaContexts.
        let start = ClientTransmissionStart(
            goReplies: goReplies,
            exportNameReply: exportNameReply,
            format: negotiation.negotiated.format,
            metaContexts: negotiation.transmissionMetaContexts
        )
        transmission = ClientTransmissionStateMachine(
            configuration: .init(
                format: start.format,
                metaContextIDs: Set(start.metaContexts.map(\.id)),
                narrowStatusContextIDs: Set(start.metaContexts.filter(\.hasNarrowStatus).map(\.id))
            )
        )
        phase = .transmission
        size = start.exportSize ?? 0
        // Bytes behind the reply are transmission bytes: the transmission machine judges them.
        if input.readableBytes > 0 { transmission.feed(input) }
        input = ByteBuffer()
        outbox.append(.succeed(waiter, .transmissionStarted(start)))
    }

    /// A fatal condition: everything waiting fails with `error`, and the connection closes.
    @usableFromInline mutating func fail(_ error: NBDError) {
        end(error)
    }

    /// The connection is over: everything waiting fails with `reason` (closing a closed
    /// channel does nothing).
    @usableFromInline mutating func end(_ reason: NBDError, requests: [Request] = []) {
        if case .closed = phase { return }
        disarm()
        var requests = requests
        if case .fatal(_, let inFlight)? = transmission.connectionClosed(reason) { requests += inFlight }
        requests += queued.map(\.request)
        queued.removeAll()
        queuedResizes = 0
        var waiters: [Waiter] = []
        if let handshakeWaiter { waiters.append(handshakeWaiter) }
        handshakeWaiter = nil
        if case .negotiating(pending: .option(_, let waiter)) = phase { waiters.append(waiter) }
        phase = .closed(reason)
        negotiation.close()
        input = ByteBuffer()
        outbox.append(.closeAndFail(reason, requests: requests, waiters: waiters))
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

extension ClientConnectionStateMachine: Sendable where Request: Sendable, Waiter: Sendable {}
extension ClientConnectionStateMachine.Action: Sendable where Request: Sendable, Waiter: Sendable {}
extension ClientConnectionStateMachine.Queued: Sendable where Request: Sendable {}
extension ClientConnectionStateMachine.Pending: Sendable where Waiter: Sendable {}
extension ClientConnectionStateMachine.Phase: Sendable where Waiter: Sendable {}
