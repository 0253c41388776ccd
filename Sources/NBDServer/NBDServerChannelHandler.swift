import Logging
@_spi(NBDMachines) import NBDCore
import NBDEventLoop
import NBDTLS
import NIOCore
import NIOSSL
import NIOTLS

/// One client connection: feeds the client's bytes to a ``ServerConnectionStateMachine`` and
/// performs what it decides; requests run concurrently, each answered as soon as its backend
/// call completes. It holds back the channel's reads while the machine says the connection
/// holds enough (back-pressure), and keeps the machine's one timer.
final class NBDServerChannelHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private var machine: ServerConnectionStateMachine
    private var context: ChannelHandlerContext?
    private let backends: [String: any NBDServerBackend]
    private var backend: (any NBDServerBackend)?
    /// The gates of the resizable exports, and that of the export opened, if resizable.
    private let gates: [String: ResizeGate]
    private var gate: ResizeGate?
    private let logger: Logger
    /// Requests run on the connection's own thread: a memory backend answers without a hop.
    private var executor: EventLoopTaskExecutor?
    /// The connection's requests, in a task group of its own, counted in the server's.
    private var requests: ConnectionRequests?
    private let requestGroups: RequestGroups
    /// The server-wide memory budget, which the machine asks before it takes memory, and
    /// this connection's number in it.
    private let memoryBudget: MemoryBudget
    private let budgetHolder: MemoryBudget.Holder
    private var timer: Scheduled<Void>?
    private var readingPaused = false
    /// A flush is queued on the event loop: replies written before it runs go out together.
    private var flushQueued = false
    /// The last buffer written since the last flush, held back so that one promise, on it,
    /// reports every byte before it written too (the channel completes writes in order).
    private var lastWrite: ByteBuffer?
    /// The bytes written since the last flush, the held-back buffer's included.
    private var unflushedBytes = 0
    /// A read the channel asked for while reading was paused, made on resuming.
    private var readHeldBack = false
    /// Requests handed out after this are dropped unperformed: nobody would read their replies.
    private var closed = false
    private let transmissionStarted: @Sendable () -> Void
    /// What a TLS handler is made from, when the server offers TLS.
    private let tls: ServerTLSCredentials?
    /// The PSK user the TLS handshake negotiated.
    private let pskIdentity = PSKIdentity()
    /// The TLS handler, once STARTTLS was acknowledged.
    private var tlsHandler: NIOSSLServerHandler?

    /// A connection serving `exports`; `transmissionStarted` is called when it leaves negotiation.
    init(
        exports: [NBDServerExport],
        gates: [String: ResizeGate] = [:],
        configuration: NBDServer.Configuration,
        tls: ServerTLSCredentials? = nil,
        requestGroups: RequestGroups = RequestGroups(),
        memoryBudget: MemoryBudget,
        logger: Logger,
        transmissionStarted: @escaping @Sendable () -> Void = {}
    ) {
        self.transmissionStarted = transmissionStarted
        self.tls = tls
        self.requestGroups = requestGroups
        self.memoryBudget = memoryBudget
        budgetHolder = memoryBudget.newHolder()
        machine = ServerConnectionStateMachine(
            exports: exports.map { export in
                .init(
                    serving: export.name,
                    description: export.description,
                    size: gates[export.name]?.size ?? export.backend.size,
                    isReadOnly: export.backend.isReadOnly,
                    flushCoversAllConnections: export.backend.flushCoversAllConnections,
                    zeroIsFast: export.backend.zeroIsFast,
                    resizableUpTo: gates[export.name] != nil ? export.maximumSize : nil,
                    maximumPayload: configuration.maximumPayload
                )
            },
            maximumOptionLength: configuration.maximumOptionLength,
            limits: .init(
                maximumPayload: configuration.maximumPayload,
                maximumRequestsInFlight: configuration.maximumRequestsInFlight,
                maximumBufferedBytes: configuration.maximumBufferedBytes,
                replyStallTimeout: configuration.replyStallTimeout,
                memoryBudgetCredit: memoryBudget.credit
            ),
            handshakeTimeout: configuration.handshakeTimeout,
            tlsMode: tls == nil ? .off : configuration.tls?.mode ?? .off,
            allowedIdentities: configuration.tls?.allowedIdentities
        )
        backends = Dictionary(exports.map { ($0.name, $0.backend) }, uniquingKeysWith: { first, _ in first })
        self.gates = gates
        self.logger = logger
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        executor = EventLoopTaskExecutor(context.eventLoop)
        requests = ConnectionRequests(executor: executor, countedIn: requestGroups)
    }

    /// The pipeline is torn down (the channel closed): let go of the context, which holds this
    /// handler, or the two keep each other, and the connection's buffers, alive for ever.
    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        requests?.finish()
    }

    func channelActive(context: ChannelHandlerContext) {
        logger.info("client connected", metadata: ["peer": "\(context.remoteAddress.map { "\($0)" } ?? "?")"])
        machine.channelActive()
        run()
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        logger.info("client disconnected")
        connectionEnded()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if tlsHandler != nil, error is NIOSSLError || error is BoringSSLError {
            // "If the handshake is unsuccessful ... the server MUST terminate the session."
            logger.warning("TLS failed: closing the client", metadata: ["error": "\(TLSFailure(error, side: .server))"])
        } else {
            logger.warning("connection error", metadata: ["error": "\(error)"])
        }
        connectionEnded()
        context.close(promise: nil)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case .handshakeCompleted? = event as? TLSUserEvent, let tls {
            let identity = tls.identity(of: tlsHandler, psk: pskIdentity)
            logger.info("TLS established", metadata: ["identity": "\(identity ?? "none")"])
            machine.tlsEstablished(identity: identity)
            run()
        }
        context.fireUserInboundEventTriggered(event)
    }

    private func connectionEnded() {
        closed = true
        // Never to be written: what the machine counts for them goes.
        if lastWrite != nil {
            lastWrite = nil
            machine.bytesWritten(unflushedBytes)
            unflushedBytes = 0
        }
        requests?.finish()
        machine.channelClosed()
        timer?.cancel()
        timer = nil
        // What was queued goes back to the memory budget now.
        run()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        machine.writabilityChanged(context.channel.isWritable)
        run()
        context.fireChannelWritabilityChanged()
    }

    /// The channel's request for more bytes: held back while reading is paused.
    func read(context: ChannelHandlerContext) {
        if readingPaused {
            readHeldBack = true
        } else {
            context.read()
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        // Another connection may have resized the export: its requests are checked against
        // the size of now (the gate checks again as each runs).
        if let gate { machine.exportSizeChanged(to: gate.size) }
        machine.bytesReceived(unwrapInboundIn(data))
        run()
    }

    /// The server is stopping: see ``ServerConnectionStateMachine/shutdownRequested()``.
    func shutDown() {
        machine.shutdownRequested()
        run()
    }

    /// Performs every action the machine has for now; with the channel gone (the pipeline let
    /// go of this handler), only settles memory with the budget and drops the rest: replies
    /// to a client that left go nowhere.
    private func run() {
        guard let context else {
            while let action = machine.next() {
                if case .adjustMemory(let delta) = action { memoryBudget.adjust(budgetHolder, by: delta) }
            }
            return
        }
        var wrote = false
        while let action = machine.next() {
            switch action {
            case .write(let buffers):
                write(buffers, context: context)
                wrote = true
            case .pauseReading:
                readingPaused = true
                logger.debug("reading paused: the connection holds as much as it may")
            case .resumeReading:
                readingPaused = false
                if readHeldBack {
                    readHeldBack = false
                    context.read()
                }
            case .reserveMemory(let amount):
                reserveMemory(amount, context: context)
            case .adjustMemory(let delta):
                memoryBudget.adjust(budgetHolder, by: delta)
            case .armTimer(let delay):
                timer?.cancel()
                let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
                timer = context.eventLoop.scheduleTask(in: delay) {
                    handler.value.timer = nil
                    handler.value.machine.timerFired()
                    handler.value.run()
                }
            case .cancelTimer:
                timer?.cancel()
                timer = nil
            case .writeAndClose(let bytes):
                let channel = context.channel
                flushReplies(context: context)
                context.writeAndFlush(wrapOutboundOut(bytes)).whenComplete { _ in channel.close(promise: nil) }
            case .startTLS(let bytes):
                startTLS(after: bytes, context: context)
            case .transmissionStarted(let agreement):
                backend = backends[agreement.export.name]
                gate = gates[agreement.export.name]
                transmissionStarted()
                logger.info(
                    "export opened",
                    metadata: ["export": "\(agreement.export.name)", "format": "\(agreement.format)"]
                )
            case .perform(let request, let operation):
                perform(request, operation, context: context)
            case .close:
                // The last replies are written first, this turn's and those whose flush is
                // still queued: a close drops what is not flushed.
                flushReplies(context: context)
                wrote = false
                context.close(promise: nil)
            case .fatal(let error):
                // A client that breaks the protocol gets a hard disconnect, and nothing else.
                logger.warning("closing a misbehaving client", metadata: ["error": "\(error)"])
                context.close(promise: nil)
            }
        }
        if wrote { queueFlush(context: context) }
    }

    /// Flushes once the event loop has run what is queued on it, so that the replies of
    /// requests completing together (a batch read in one go, answered one task after another)
    /// leave in one system call rather than one each.
    private func queueFlush(context: ChannelHandlerContext) {
        guard !flushQueued else { return }
        flushQueued = true
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        context.eventLoop.execute {
            handler.value.flushQueued = false
            if let context = handler.value.context { handler.value.flushReplies(context: context) }
        }
    }

    /// Writes the held-back buffer with the promise that reports what was written since the
    /// last flush, and flushes.
    private func flushReplies(context: ChannelHandlerContext) {
        if let last = lastWrite {
            let count = unflushedBytes
            lastWrite = nil
            unflushedBytes = 0
            let written = context.eventLoop.makePromise(of: Void.self)
            context.write(wrapOutboundOut(last), promise: written)
            let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
            written.futureResult.whenComplete { _ in
                handler.value.machine.bytesWritten(count)
                handler.value.run()
            }
        }
        context.flush()
    }

    /// Sends STARTTLS's acknowledgement in clear, then puts TLS in front of everything: the
    /// acknowledgement is in the channel's buffer, flushed, before the TLS handler is added.
    private func startTLS(after acknowledgement: ByteBuffer, context: ChannelHandlerContext) {
        write([acknowledgement], context: context)
        flushReplies(context: context)
        do {
            guard let tls else { throw NBDError(.tlsFailed, "TLS is not configured", connectionUsable: false) }
            let handler = try tls.makeHandler(recording: pskIdentity)
            try context.pipeline.syncOperations.addHandler(handler, position: .first)
            tlsHandler = handler
        } catch {
            logger.error("cannot start TLS: closing the client", metadata: ["error": "\(error)"])
            connectionEnded()
            context.close(promise: nil)
        }
    }

    /// Asks the budget for memory: granted now, the machine goes on in this run; otherwise
    /// it goes on when the budget wakes it, on this connection's thread.
    private func reserveMemory(_ amount: Int, context: ChannelHandlerContext) {
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        let granted = memoryBudget.reserve(budgetHolder, amount) {
            handler.eventLoop.execute {
                handler.value.machine.memoryGranted()
                handler.value.run()
            }
        }
        if granted { machine.memoryGranted() }
    }

    /// Writes a reply's buffers, all but the last buffer of those since the last flush at once:
    /// ``flushReplies(context:)`` writes that one, and tells the machine when all are written.
    private func write(_ buffers: [ByteBuffer], context: ChannelHandlerContext) {
        for buffer in buffers {
            if let previous = lastWrite { context.write(wrapOutboundOut(previous), promise: nil) }
            lastWrite = buffer
            unflushedBytes += buffer.readableBytes
        }
    }

    private func perform(_ request: RequestHeader, _ operation: ServerOperation, context: ChannelHandlerContext) {
        let backend = self.backend!
        let gate = self.gate
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        requests?.submit {
            // Requests of a client that has gone are dropped, not performed; the machine still
            // hears of their end, to give their memory back.
            let gone = handler.eventLoop.inEventLoop && handler.value.closed
            let reply =
                gone
                ? .failed(.ESHUTDOWN, message: "the client has gone") : await RequestPerformer.run(operation, on: backend, within: gate)
            // Usually on the loop already (the task's executor): no closure to make then.
            if handler.eventLoop.inEventLoop {
                handler.value.completed(request, reply)
            } else {
                handler.eventLoop.execute { handler.value.completed(request, reply) }
            }
        }
    }

    private func completed(_ request: RequestHeader, _ reply: ServerReply) {
        if case .failed(let errno, _) = reply {
            logger.debug("request failed", metadata: ["command": "\(request.type)", "error": "\(errno)"])
        }
        machine.requestCompleted(request, reply)
        run()
    }
}
