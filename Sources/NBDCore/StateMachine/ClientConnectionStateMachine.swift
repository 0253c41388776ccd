import NIOCore

/// What a caller waiting on a client connection is answered with.
@_spi(NBDMachines) public enum ClientConnectionOutcome: Sendable {
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
@_spi(NBDMachines) public struct ClientTransmissionStart: Sendable {
    /// How requests and replies are framed.
    public var format: TransmissionFormat
    /// The metadata contexts usable with block status.
    public var metaContexts: [NBDMetaContext]
    /// The export as the server described it (GO's `NBD_INFO_*`, or EXPORT_NAME's size and
    /// flags), under the name asked for unless the server gave its own.
    public var info: NBDExportInfo
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
/// Each child lives inside the phase it belongs to (``Phase``): a negotiation machine while
/// negotiating, a transmission machine with its request queue and clock in transmission,
/// nothing once closed; no state of one phase can be reached from another. The rules are split
/// by concern: negotiation and TLS (`+Negotiation`), the requests and their queue
/// (`+Requests`), the request clock (`+Clock`), the soft disconnects (`+Disconnect`) and the
/// direct reads (`+DirectReads`).
///
/// Every input is an event (`xxxReceived`, `xxxRequested`, `timerFired`, `tlsEstablished`,
/// `errorCaught`, `channelClosed`); what to do then comes out of ``next()`` until it returns
/// nil. `Request` is the caller's handle of one request (compared by identity); `Waiter` that
/// of one call waiting for an ``ClientConnectionOutcome``.
@_spi(NBDMachines) public struct ClientConnectionStateMachine<Request: AnyObject, Waiter> {
    /// What the connection negotiates and its bounds.
    public struct Configuration: Sendable {
        /// Bounds on what the server may send while negotiating.
        public var limits: ClientNegotiationStateMachine.Limits
        /// Requests on the wire at once; more wait in a queue.
        public var maximumRequestsInFlight: Int
        /// How long the server may take to answer each negotiation step.
        public var negotiationTimeout: TimeAmount
        /// Whether TLS is negotiated right after the handshake.
        public var tlsPolicy: NBDTLSPolicy
        /// How long a request on the wire may wait for its reply; nil for ever. Past it the
        /// connection is closed hard (its state is unknown) and every request fails with
        /// ``NBDError/Code/timedOut``.
        public var requestTimeout: TimeAmount?

        /// A configuration with the given settings.
        public init(
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
    public enum Action {
        /// Write these bytes (a negotiation message) and flush.
        case write(ByteBuffer)
        /// A request without data went into the output (its header, as the negotiated format
        /// frames it, with any payload of its own): ``takeOutput()`` gives it, with those of
        /// the requests before it, to write and flush once the caller has nothing else to
        /// do, so that requests made together leave together.
        case requestBuffered(RequestHeader, Request)
        /// Write `bytes` (the output so far, ending with this WRITE's header), then the
        /// request's data: the bytes `payload` of it for a piece, all of it when nil.
        case sendRequest(RequestHeader, bytes: ByteBuffer, Request, payload: Range<Int>?)
        /// Write these bytes (`NBD_CMD_DISC`), flush, then close the connection.
        case sendDisconnect(ByteBuffer)
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

    /// A request submitted and not yet on the wire.
    @usableFromInline
    struct Queued {
        @usableFromInline let request: Request
        @usableFromInline let command: CommandType
        @usableFromInline let flags: CommandFlags
        @usableFromInline let offset: UInt64
        @usableFromInline let length: UInt64
        @usableFromInline let onlyContexts: [UInt32]?
        /// For a piece of a WRITE, the bytes of the request's data it carries; nil for all.
        @usableFromInline let payload: Range<Int>?

        @usableFromInline
        init(
            request: Request,
            command: CommandType,
            flags: CommandFlags,
            offset: UInt64,
            length: UInt64,
            onlyContexts: [UInt32]? = nil,
            payload: Range<Int>? = nil
        ) {
            self.request = request
            self.command = command
            self.flags = flags
            self.offset = offset
            self.length = length
            self.onlyContexts = onlyContexts
            self.payload = payload
        }
    }

    /// A request sent in several pieces, until its last piece is answered.
    @usableFromInline
    struct Split {
        /// Pieces not answered yet, queued or on the wire.
        @usableFromInline var remaining: Int
        /// The first error of a piece: the request's.
        @usableFromInline var error: NBDError?
        /// A TRIM, WRITE_ZEROES or CACHE sent whole with extended headers, to send again in
        /// pieces if the server finds it too large (`EOVERFLOW`).
        @usableFromInline var whole: Queued?

        @usableFromInline init(remaining: Int, whole: Queued? = nil) {
            self.remaining = remaining
            self.whole = whole
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
        case option(OptionRequest, Waiter)
        /// The reply to the ABORT of a soft disconnect.
        case abort
    }

    /// The negotiation phase: its machine, what it waits for, and the bytes not parsed yet.
    @usableFromInline
    struct Negotiating {
        @usableFromInline var machine: ClientNegotiationStateMachine
        /// What the connection waits for; nil when an option may be sent.
        @usableFromInline var pending: Pending?
        /// Negotiation bytes not yet parsed (a reply split across reads).
        @usableFromInline var input = ByteBuffer()

        @usableFromInline init(machine: ClientNegotiationStateMachine, pending: Pending?) {
            self.machine = machine
            self.pending = pending
        }
    }

    /// The transmission phase: its machine, strict mode, the requests waiting to go on the
    /// wire, those sent in pieces, a resize under way, and the request clock.
    @usableFromInline
    struct Transmitting {
        @usableFromInline var machine: ClientTransmissionStateMachine<Request>
        /// Strict mode: the export as negotiated, its size that of the last resize.
        @usableFromInline var validator: RequestValidator
        @usableFromInline var queue = CircularBuffer<Queued>()
        /// Requests sent in several pieces, by identity.
        @usableFromInline var splits: [ObjectIdentifier: Split] = [:]
        /// How many of `queue` are resizes: while none is queued or on the wire, requests go
        /// in order with no look at ranges.
        @usableFromInline var queuedResizes = 0
        /// The resize on the wire: its request, and the sizes before and after.
        @usableFromInline var resizing: (request: Request, from: UInt64, to: UInt64)?
        /// The export's size: the server's, then that of each resize it accepted.
        @inlinable var size: UInt64 {
            get { validator.export.size }
            set { validator.export.size = newValue }
        }
        /// The request clock (see ``Configuration/tick``): ticks gone by, and whether it runs,
        /// which it does only while requests are on the wire.
        @usableFromInline var ticks: UInt64 = 0
        @usableFromInline var clockRunning = false
        /// Headers of requests sent and not yet taken by ``takeOutput()``.
        @usableFromInline var output = ByteBuffer()

        @usableFromInline init(machine: ClientTransmissionStateMachine<Request>, validator: RequestValidator) {
            self.machine = machine
            self.validator = validator
        }
    }

    @usableFromInline
    enum Phase {
        case negotiating(Negotiating)
        case transmission(Transmitting)
        case closed(NBDError)
        /// A child is being changed in place (so that its storage is not shared, and not
        /// copied); never seen between two events.
        case modifying
    }

    public let configuration: Configuration
    @usableFromInline var phase: Phase
    @usableFromInline var outbox = Outbox<Action>()
    @usableFromInline var handshakeWaiter: Waiter?
    /// A soft disconnect was asked for (by a caller, or by the server's shutdown).
    @usableFromInline var disconnecting = false
    @usableFromInline var disconnectWaiters: [Waiter] = []
    @usableFromInline var channelIsOpen = true
    /// What the armed deadline waits for, said as the error it becomes.
    @usableFromInline var deadline: String?
    /// The TLS version agreed, e.g. "tlsv13", once TLS is up.
    public internal(set) var tlsVersion: String?
    /// The TLS cipher suite agreed, by its IANA name, once TLS is up.
    public internal(set) var tlsCipherSuite: String?

    /// A connection that has just been dialed; `handshakeWaiter` is answered with
    /// ``ClientConnectionOutcome/connected(_:)`` once the handshake (and TLS, when asked) is done.
    public init(configuration: Configuration, handshakeWaiter: Waiter) {
        self.configuration = configuration
        self.phase = .negotiating(Negotiating(machine: ClientNegotiationStateMachine(limits: configuration.limits), pending: .greeting))
        self.handshakeWaiter = handshakeWaiter
    }

    // MARK: State

    /// The transmission phase's state, moved out (the phase is `.modifying` until it is put
    /// back), or nil outside that phase. A pattern match on `phase` would copy it, every
    /// buffer and table in it retained and released, on every event.
    @inlinable mutating func takeTransmission() -> Transmitting? {
        guard case .transmission = phase else { return nil }
        var taken = Phase.modifying
        swap(&taken, &phase)
        guard case .transmission(let state) = consume taken else { preconditionFailure("the phase changed") }
        return state
    }

    /// The requests sent since the last call (see ``Action/requestBuffered(_:_:)``), as
    /// bytes to write; empty when there are none.
    @inlinable public mutating func takeOutput() -> ByteBuffer {
        guard var state = takeTransmission() else { return ByteBuffer() }
        var output = ByteBuffer()
        swap(&output, &state.output)
        phase = .transmission(state)
        return output
    }

    /// Whether the connection is in the transmission phase.
    @inlinable public var isInTransmission: Bool { if case .transmission = phase { true } else { false } }

    /// Why the connection ended, once it has.
    public var closedReason: NBDError? { if case .closed(let error) = phase { error } else { nil } }

    /// The export's size in transmission: the server's, then that of each resize it accepted.
    /// Every request is checked against it as it goes on the wire.
    public var exportSize: UInt64? { if case .transmission(let state) = phase { state.size } else { nil } }

    // MARK: Events

    /// The connection is up: the greeting has a deadline.
    public mutating func channelActive() {
        arm("the server sent no NBD greeting")
    }

    /// Bytes from the server.
    @inlinable public mutating func bytesReceived(_ bytes: ByteBuffer) {
        if var state = takeTransmission() {
            state.machine.feed(bytes)
            phase = .transmission(state)
            return
        }
        switch phase {
        case .transmission:
            break
        case .negotiating(var state):
            state.input.appendReceived(bytes)
            phase = .negotiating(state)
            negotiate()
        case .closed, .modifying:
            break
        }
    }

    /// The channel reported an error; the connection ends.
    public mutating func errorCaught(_ error: any Error) {
        if case .negotiating(let state) = phase, case .tlsHandshake? = state.pending {
            fail(NBDError(.tlsFailed, "the TLS handshake failed", connectionUsable: false, underlying: error))
        } else {
            fail(NBDError(.connectionClosed, "the connection failed", connectionUsable: false, underlying: error))
        }
    }

    // MARK: Actions

    /// The next thing to do, or nil until the next event.
    @inlinable public mutating func next() -> Action? {
        while true {
            if let action = outbox.next() { return action }
            guard var state = takeTransmission() else { return nil }
            guard let action = state.machine.next() else {
                phase = .transmission(state)
                return nil
            }
            switch action {
            case .data(let request, let offset, let bytes):
                phase = .transmission(state)
                return .deliverData(request, offset: offset, bytes: bytes)
            case .hole(let request, let offset, let length):
                phase = .transmission(state)
                return .deliverHole(request, offset: offset, length: length)
            case .blockStatus(let request, let id, let descriptors):
                phase = .transmission(state)
                return .deliverExtents(request, contextID: id, descriptors: descriptors)
            case .complete(let request, let pieceError):
                if let resize = state.resizing, resize.request === request {
                    if pieceError == nil { state.size = resize.to }
                    state.resizing = nil
                }
                // A piece of a request sent in pieces: the request is done with its last.
                let answer = state.splits.isEmpty ? .some(pieceError) : Self.pieceAnswered(request, pieceError, &state)
                sendQueued(&state)
                phase = .transmission(state)
                if pieceError?.serverErrno == .ESHUTDOWN {
                    // "If the client receives an NBD_ESHUTDOWN error it MUST initiate a soft disconnect."
                    disconnectRequested(waiter: nil)
                }
                disconnectIfIdle()
                if let error = answer { return .complete(request, error: error) }
            case .fatal(let error, let requests):
                phase = .transmission(state)
                end(error, requests: requests)
            }
        }
    }

    // MARK: The end

    /// A fatal condition: everything waiting fails with `error`, and the connection closes.
    @usableFromInline mutating func fail(_ error: NBDError) {
        end(error)
    }

    /// The connection is over: everything waiting fails with `reason` (closing a closed
    /// channel does nothing).
    @usableFromInline mutating func end(_ reason: NBDError, requests: [Request] = []) {
        var requests = requests
        var waiters: [Waiter] = []
        switch phase {
        case .closed, .modifying:
            return
        case .negotiating(let state):
            if case .option(_, let waiter)? = state.pending { waiters.append(waiter) }
        case .transmission(var state):
            if case .fatal(_, let inFlight)? = state.machine.connectionClosed(reason) { requests += inFlight }
            requests += state.queue.map(\.request)
        }
        disarm()
        if let handshakeWaiter { waiters.insert(handshakeWaiter, at: 0) }
        handshakeWaiter = nil
        phase = .closed(reason)
        outbox.append(.closeAndFail(reason, requests: requests, waiters: waiters))
    }
}

extension ClientConnectionStateMachine: Sendable where Request: Sendable, Waiter: Sendable {}
extension ClientConnectionStateMachine.Action: Sendable where Request: Sendable, Waiter: Sendable {}
extension ClientConnectionStateMachine.Queued: Sendable where Request: Sendable {}
extension ClientConnectionStateMachine.Pending: Sendable where Waiter: Sendable {}
extension ClientConnectionStateMachine.Negotiating: Sendable where Waiter: Sendable {}
extension ClientConnectionStateMachine.Transmitting: Sendable where Request: Sendable {}
extension ClientConnectionStateMachine.Split: Sendable where Request: Sendable {}
extension ClientConnectionStateMachine.Phase: Sendable where Request: Sendable, Waiter: Sendable {}
