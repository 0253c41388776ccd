import Logging
@_spi(NBDMachines) import NBDCore
import NBDTLS
import NIOCore
import NIOSSL
import NIOTLS

/// The one channel handler of a client connection. It feeds every event to a
/// `ClientConnectionStateMachine` and performs the actions it returns, in ``run()``; it keeps
/// only I/O state: the context, the TLS setup, the timer, and what direct reads need.
/// Every method runs on the channel's event loop.
final class NBDClientChannelHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = Never
    typealias OutboundOut = ByteBuffer
    typealias Waiter = EventLoopPromise<ClientConnectionOutcome>
    typealias Machine = ClientConnectionStateMachine<PendingRequest, Waiter>

    /// What STARTTLS needs to start TLS on the connection.
    struct TLSSetup {
        let context: NIOSSLContext
        /// The name the server's certificate must carry, and the one sent for SNI.
        let hostname: String?
    }

    private var machine: Machine
    private var context: ChannelHandlerContext?
    private let eventLoop: EventLoop
    private let logger: Logger
    private let tls: TLSSetup?
    private var serverHelloObserver: ServerHelloObserver?
    private var timer: Scheduled<Void>?
    /// Set while the socket carries the NBD stream in clear (before TLS, or without it).
    private var directRead: DirectRead?
    /// Whether the last READ chunk seen was large, so the next is likely large too.
    private var largeChunksFlowing = false
    /// Buffers for batches of replies, reused once nothing holds a slice of them (as SwiftNIO does).
    private var batches = NIOPooledRecvBufferAllocator(
        capacity: 16,
        recvAllocator: FixedSizeRecvByteBufferAllocator(capacity: DirectRead.batchSize)
    )
    /// Whether a flush is queued on the event loop (see ``queueFlush(context:)``).
    private var flushQueued = false
    /// READ data read straight into destinations so far.
    private(set) var bytesReadDirectly = 0
    /// Why the connection ended, once the machine ended it (a timeout, a violation, the server
    /// closing): what `NBDClient` reports as the cause of a loss.
    private(set) var endReason: NBDError?

    init(
        eventLoop: EventLoop,
        configuration: Machine.Configuration,
        tls: TLSSetup?,
        directRead: DirectRead?,
        logger: Logger,
        handshake: Waiter
    ) {
        machine = Machine(configuration: configuration, handshakeWaiter: handshake)
        self.eventLoop = eventLoop
        self.tls = tls
        self.directRead = directRead
        self.logger = logger
    }

    // MARK: What the API asks

    /// The TLS version agreed, e.g. "tlsv13".
    var tlsVersion: String? { machine.tlsVersion }
    /// The cipher suite agreed, e.g. "TLS_AES_256_GCM_SHA384".
    var tlsCipherSuite: String? { machine.tlsCipherSuite }

    /// Sends an option (EXPORT_NAME too); the outcome is its replies, or the start of transmission.
    func send(_ option: OptionRequest) -> EventLoopFuture<ClientConnectionOutcome> {
        let promise = eventLoop.makePromise(of: ClientConnectionOutcome.self)
        logger.debug("sending option", metadata: ["option": "\(option.code)"])
        machine.optionRequested(option, waiter: promise)
        run()
        return promise.futureResult
    }

    /// Submits a request: checked, then sent now (in pieces if it must be), or queued under
    /// the in-flight cap.
    func submit(_ request: PendingRequest) {
        machine.requestSubmitted(
            request,
            command: request.type,
            flags: request.flags,
            offset: request.offset,
            length: request.length,
            onlyContexts: request.onlyContexts
        )
        run()
    }

    /// Another connection resized the export.
    func exportResizedElsewhere(to size: UInt64) {
        machine.exportResizedElsewhere(to: size)
        run()
    }

    /// The caller stopped waiting for `request`.
    func cancel(_ request: PendingRequest) {
        machine.requestCancelled(request)
        run()
    }

    /// Soft disconnect; the future completes once the connection has closed.
    func disconnect() -> EventLoopFuture<Void> {
        let promise = eventLoop.makePromise(of: ClientConnectionOutcome.self)
        machine.disconnectRequested(waiter: promise)
        run()
        return promise.futureResult.map { _ in }
    }

    /// Hard disconnect: close the socket now.
    func close() {
        context?.close(promise: nil)
    }

    // MARK: Channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        machine.channelActive()
        run()
    }

    /// The pipeline is torn down (the channel closed): let go of the context, which holds this
    /// handler, or the two keep each other, and the connection's buffers, alive for ever.
    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        timer?.cancel()
        timer = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let bytes = unwrapInboundIn(data)
        // SwiftNIO read as much as it could: more may be waiting.
        let afterFullRead = bytes.readableBytes >= DirectRead.wakeupReadSize
        machine.bytesReceived(bytes)
        run()
        readDirectly(afterFullRead: afterFullRead)
    }

    func channelInactive(context: ChannelHandlerContext) {
        machine.channelClosed()
        run()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // In words: which TLS check failed, or which socket error happened.
        if let tls, !machine.isInTransmission, error is NIOSSLError || error is NIOSSLExtraError || error is BoringSSLError {
            machine.errorCaught(TLSFailure(error, side: .client(hostname: tls.hostname)))
        } else {
            machine.errorCaught(ConnectionFailure(error) ?? error)
        }
        run()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case .handshakeCompleted = event as? TLSUserEvent {
            let version = try? context.pipeline.syncOperations.handler(type: NIOSSLClientHandler.self).tlsVersion
            let cipherSuite = serverHelloObserver?.cipherSuite.map(TLSServerHello.name(of:))
            serverHelloObserver = nil
            machine.tlsEstablished(version: version.map { "\($0)" }, cipherSuite: cipherSuite)
            run()
        }
        context.fireUserInboundEventTriggered(event)
    }

    // MARK: Actions

    /// Performs every action the machine has for now; what was written is flushed once the
    /// event loop has run what is queued on it (see ``queueFlush(context:)``).
    private func run() {
        guard let context else { return runDetached() }
        var flush = false
        while let action = machine.next() {
            switch action {
            case .write(let bytes):
                context.write(wrapOutboundOut(bytes), promise: nil)
                flush = true
            case .requestBuffered(let header, _):
                trace(header)
                flush = true
            case .sendRequest(let header, let bytes, let request, let payload):
                trace(header)
                context.write(wrapOutboundOut(bytes), promise: nil)
                for buffer in request.takePayload(payload) {
                    context.write(wrapOutboundOut(buffer), promise: nil)
                }
                flush = true
            case .sendDisconnect(let bytes):
                logger.debug("sending NBD_CMD_DISC")
                let channel = context.channel
                context.writeAndFlush(wrapOutboundOut(bytes)).whenComplete { _ in channel.close(promise: nil) }
            case .startTLS:
                startTLS(context: context)
            case .armTimer(let after):
                timer?.cancel()
                let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
                timer = context.eventLoop.scheduleTask(in: after) {
                    handler.value.machine.timerFired()
                    handler.value.run()
                }
            case .cancelTimer:
                timer?.cancel()
                timer = nil
            case .succeed(let waiter, let outcome):
                waiter.succeed(outcome)
            case .fail(let waiter, let error):
                waiter.fail(error)
            case .deliverData(let request, let offset, let bytes):
                request.destination?.write(bytes, at: offset)  // nil once the caller stopped waiting
            case .deliverHole(let request, let offset, let length):
                request.destination?.zero(at: offset, length: Int(length))
            case .deliverExtents(let request, let id, let descriptors):
                request.extents[id] = descriptors
            case .complete(let request, let error):
                logger.trace("reply", metadata: ["command": "\(request.type)", "error": "\(error.map { "\($0)" } ?? "none")"])
                if let error { request.fail(error) } else { request.succeed() }
            case .cancel(let request):
                request.fail(CancellationError())
            case .close:
                // A close drops what is not flushed.
                context.flush()
                context.close(promise: nil)
            case .closeAndFail(let error, let requests, let waiters):
                logger.debug("connection ended", metadata: ["reason": "\(error)"])
                endReason = endReason ?? error
                for request in requests { request.fail(error) }
                for waiter in waiters { waiter.fail(error) }
                context.close(promise: nil)
            }
        }
        if flush { queueFlush(context: context) }
    }

    private func trace(_ header: RequestHeader) {
        logger.trace(
            "request",
            metadata: [
                "command": "\(header.type)", "cookie": "\(header.cookie)", "offset": "\(header.offset)", "length": "\(header.length)",
            ]
        )
    }

    /// Writes the machine's output and flushes once the event loop has run what is queued on
    /// it: the requests that tasks resumed by one batch of replies make one after another
    /// leave in one buffer and one system call, not one each (as nbdcopy's requests do).
    private func queueFlush(context: ChannelHandlerContext) {
        guard !flushQueued else { return }
        flushQueued = true
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        context.eventLoop.execute {
            handler.value.flushQueued = false
            guard let context = handler.value.context else { return }
            let output = handler.value.machine.takeOutput()
            if output.readableBytes > 0 { context.write(handler.value.wrapOutboundOut(output), promise: nil) }
            context.flush()
        }
    }

    /// After the pipeline let go of this handler the channel is gone: what is left to do is to
    /// answer the callers still waiting (a disconnect asked for afterwards, late cancellations).
    private func runDetached() {
        while let action = machine.next() {
            switch action {
            case .succeed(let waiter, let outcome): waiter.succeed(outcome)
            case .fail(let waiter, let error): waiter.fail(error)
            case .complete(let request, let error):
                if let error { request.fail(error) } else { request.succeed() }
            case .cancel(let request): request.fail(CancellationError())
            case .closeAndFail(let error, let requests, let waiters):
                for request in requests { request.fail(error) }
                for waiter in waiters { waiter.fail(error) }
            case .write, .requestBuffered, .sendRequest, .sendDisconnect, .startTLS, .armTimer, .cancelTimer, .deliverData, .deliverHole,
                .deliverExtents, .close:
                break
            }
        }
    }

    /// STARTTLS was acknowledged: TLS on the same connection, then negotiation goes on encrypted.
    private func startTLS(context: ChannelHandlerContext) {
        // What was written so far goes in clear, before the TLS handler is in place.
        context.flush()
        // From here the socket carries TLS records, not the NBD stream: SwiftNIO reads them all.
        if directRead != nil {
            directRead = nil
            try? context.channel.syncOptions?.setOption(.recvAllocator, value: Dialer.receiveAllocator)
            try? context.channel.syncOptions?.setOption(.maxMessagesPerRead, value: Dialer.readsPerEvent)
        }
        do {
            guard let tls else { throw NBDError(.tlsFailed, "no TLS configuration", connectionUsable: false) }
            let handler = try NIOSSLClientHandler(context: tls.context, serverHostname: tls.hostname.flatMap { $0.isIPAddress ? nil : $0 })
            try context.pipeline.syncOperations.addHandler(handler, position: .first)
            // Before the TLS handler: it sees the server's first TLS bytes as they arrive.
            let observer = ServerHelloObserver()
            try context.pipeline.syncOperations.addHandler(observer, position: .first)
            serverHelloObserver = observer
        } catch {
            machine.errorCaught(error)
        }
    }

    /// Reads on from the socket while it may have bytes (see ``DirectRead``): the data of a
    /// large READ chunk straight into the READ's destination; other bytes into batch buffers,
    /// parsed and copied as usual. A read that does not fill its room has emptied the socket:
    /// SwiftNIO wakes the handler again when more arrives.
    private func readDirectly(afterFullRead: Bool) {
        guard let directRead, let context, afterFullRead else { return }
        for _ in 0..<DirectRead.readsPerEvent {
            // A closed channel's descriptor number may already belong to another file.
            guard context.channel.isActive, machine.readsDirectly else { return }
            let expected = machine.expectedData
            let filled: Bool
            if let (request, offset, count, chunkLength) = expected, chunkLength >= DirectRead.largeChunk,
                let destination = request.destination, destination.fillsInPlace
            {
                largeChunksFlowing = true
                let received = destination.receive(at: offset, count: count, using: directRead.read(into:))
                guard received > 0 else { return }
                bytesReadDirectly += received
                machine.dataReadDirectly(received)
                // Reading on until the socket is empty: more of the data may have come meanwhile.
                filled = true
            } else {
                if expected != nil { largeChunksFlowing = false }
                // After a large chunk only the next header, as another large chunk may follow.
                let size = largeChunksFlowing ? DirectRead.headerSize : DirectRead.batchSize
                // Unparsed bytes (part of a header) go in front, so that the header is whole.
                var unparsed = machine.unparsedByteCount <= DirectRead.headerSize ? machine.takeUnparsed() : ByteBuffer()
                var received = 0
                let (batch, _) = batches.buffer(allocator: context.channel.allocator) { buffer in
                    buffer.writeBuffer(&unparsed)
                    buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: size) { room in
                        received = max(0, directRead.read(into: UnsafeMutableRawBufferPointer(rebasing: room.prefix(size))))
                        return received
                    }
                }
                // Fed even when nothing was read: the unparsed bytes are in it.
                machine.bytesReceived(batch)
                guard received > 0 else { return }
                filled = received == size
            }
            run()
            guard filled else { return }
        }
    }
}

extension String {
    /// An IPv4 or IPv6 literal, which is no name for SNI.
    var isIPAddress: Bool { (try? SocketAddress(ipAddress: self, port: 0)) != nil }
}
