import Logging
import NIOCore
import NIOSSL
import NIOTLS
import NBDCore

/// The one channel handler of a client connection. It feeds the server's bytes to the
/// negotiation machine, then to the transmission machine, and performs what they decide.
/// Every method runs on the channel's event loop.
final class NBDClientChannelHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = Never
    typealias OutboundOut = ByteBuffer

    private var negotiation: ClientNegotiationStateMachine
    /// Bytes of the negotiation phase not yet parsed (a reply split across reads).
    private var unparsed = ByteBuffer()
    private var transmission: ClientTransmissionStateMachine<PendingRequest>?
    private var context: ChannelHandlerContext?
    private let logger: Logger
    private let maximumInFlight: Int

    /// Fulfilled with the server's handshake flags once the client flags are sent.
    let handshake: EventLoopPromise<HandshakeFlags>
    /// The caller of the option awaiting its final reply.
    private var pendingOption: (code: OptionCode, promise: EventLoopPromise<[OptionReply.Body]>)?
    private var pendingExportName: EventLoopPromise<ExportNameReply>?
    /// Requests waiting for room under the in-flight cap.
    private var queued = CircularBuffer<PendingRequest>()
    private var disconnectRequested: EventLoopPromise<Void>?
    /// Why the connection ended, once it has.
    private var closedError: NBDError?
    private var isShutDown = false
    /// The TLS handshake under way after STARTTLS, if any.
    private var tlsHandshake: EventLoopPromise<Void>?
    /// Whether the connection is encrypted.
    private(set) var isTLS = false
    /// The TLS version agreed, e.g. "tlsv13".
    private(set) var tlsVersion: String?
    /// The cipher suite agreed, e.g. "TLS_AES_256_GCM_SHA384".
    private(set) var tlsCipherSuite: String?
    private var serverHelloObserver: ServerHelloObserver?

    private let negotiationTimeout: TimeAmount
    private var timeout: Scheduled<Void>?
    /// Set while the socket carries the NBD stream in clear (before TLS, or without it).
    private var directRead: DirectRead?
    /// Whether the last READ chunk seen was large, so the next is likely large too.
    private var largeChunksFlowing = false
    /// Buffers for batches of replies, reused once nothing holds a slice of them (as SwiftNIO does).
    private var batches = NIOPooledRecvBufferAllocator(capacity: 16, recvAllocator: FixedSizeRecvByteBufferAllocator(capacity: DirectRead.batchSize))
    /// READ data read straight into destinations so far.
    private(set) var bytesReadDirectly = 0

    init(eventLoop: EventLoop, limits: ClientNegotiationStateMachine.Limits, maximumInFlight: Int, negotiationTimeout: TimeAmount,
         directRead: DirectRead?, logger: Logger) {
        negotiation = ClientNegotiationStateMachine(limits: limits)
        self.directRead = directRead
        handshake = eventLoop.makePromise()
        self.maximumInFlight = maximumInFlight
        self.negotiationTimeout = negotiationTimeout
        self.logger = logger
    }

    // MARK: Channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        armTimeout("the server sent no NBD greeting")
    }

    /// Every wait of the negotiation phase is bounded: the server must answer in time.
    private func armTimeout(_ what: String) {
        guard let context else { return }
        timeout?.cancel()
        let loopBound = NIOLoopBound(self, eventLoop: context.eventLoop)
        let seconds = negotiationTimeout.nanoseconds / 1_000_000_000
        timeout = context.eventLoop.scheduleTask(in: negotiationTimeout) {
            loopBound.value.fatal(NBDError(.timedOut, "\(what) within \(seconds) s", connectionUsable: false))
        }
    }

    private func disarmTimeout() {
        timeout?.cancel()
        timeout = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        // SwiftNIO read as much as it could: more may be waiting.
        let afterFullRead = bytes.readableBytes >= DirectRead.wakeupReadSize
        if transmission == nil {
            // Negotiation messages may arrive split across reads: keep what is not yet whole.
            if unparsed.readableBytes > 0 {
                unparsed.writeBuffer(&bytes)
                swap(&bytes, &unparsed)
            }
            negotiate(&bytes)
            if transmission == nil {
                unparsed = bytes
                return
            }
        }
        if bytes.readableBytes > 0 {
            transmission!.feed(bytes)
            runTransmission()
            readDirectly(afterFullRead: afterFullRead)
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
            guard closedError == nil, context.channel.isActive, !transmission!.hasFailed else { return }
            let expected = transmission!.expectedData
            let filled: Bool
            if let (request, offset, count, chunkLength) = expected, chunkLength >= DirectRead.largeChunk,
               let destination = request.destination, destination.fillsInPlace {
                largeChunksFlowing = true
                let received = destination.receive(at: offset, count: count, using: directRead.read(into:))
                guard received > 0 else { return }
                bytesReadDirectly += received
                transmission!.dataReadDirectly(received)
                // Reading on until the socket is empty: more of the data may have come meanwhile.
                filled = true
            } else {
                if expected != nil { largeChunksFlowing = false }
                // After a large chunk only the next header, as another large chunk may follow.
                let size = largeChunksFlowing ? DirectRead.headerSize : DirectRead.batchSize
                // Unparsed bytes (part of a header) go in front, so that the header is whole.
                var unparsed = transmission!.unparsedByteCount <= DirectRead.headerSize ? transmission!.takeUnparsed() : ByteBuffer()
                var received = 0
                let (batch, _) = batches.buffer(allocator: context.channel.allocator) { buffer in
                    buffer.writeBuffer(&unparsed)
                    buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: size) { room in
                        received = max(0, directRead.read(into: UnsafeMutableRawBufferPointer(rebasing: room.prefix(size))))
                        return received
                    }
                }
                // Fed even when nothing was read: the unparsed bytes are in it.
                transmission!.feed(batch)
                guard received > 0 else { return }
                filled = received == size
            }
            runTransmission()
            guard filled else { return }
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        shutDown(NBDError(.connectionClosed, "the server closed the connection", connectionUsable: false))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if tlsHandshake != nil {
            shutDown(NBDError(.tlsFailed, "the TLS handshake failed (certificate not trusted, wrong name or expired; wrong PSK or user; or no TLS on the server)",
                              connectionUsable: false, underlying: error))
        } else {
            shutDown(NBDError(.connectionClosed, "the connection failed", connectionUsable: false, underlying: error))
        }
        context.close(promise: nil)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case .handshakeCompleted = event as? TLSUserEvent {
            isTLS = true
            if let version = try? context.pipeline.syncOperations.handler(type: NIOSSLClientHandler.self).tlsVersion {
                tlsVersion = "\(version)"
            }
            tlsCipherSuite = serverHelloObserver?.cipherSuite.map(TLSServerHello.name(of:))
            serverHelloObserver = nil
            let promise = tlsHandshake
            tlsHandshake = nil
            disarmTimeout()
            promise?.succeed(())
        }
        context.fireUserInboundEventTriggered(event)
    }

    /// After STARTTLS was acknowledged: TLS on the same connection, then negotiation goes on
    /// encrypted. Bytes that arrived in clear after the ACK would be an injection: refused.
    func upgradeToTLS(_ sslContext: NIOSSLContext, hostname: String?) -> EventLoopFuture<Void> {
        let promise = handshake.futureResult.eventLoop.makePromise(of: Void.self)
        guard let context, closedError == nil else {
            promise.fail(closedError ?? NBDError(.connectionClosed, "the connection is closed", connectionUsable: false))
            return promise.futureResult
        }
        // From here the socket carries TLS records, not the NBD stream: SwiftNIO reads them all.
        if directRead != nil {
            directRead = nil
            try? context.channel.syncOptions?.setOption(.recvAllocator, value: Dialer.receiveAllocator)
            try? context.channel.syncOptions?.setOption(.maxMessagesPerRead, value: Dialer.readsPerEvent)
        }
        guard unparsed.readableBytes == 0 else {
            fatal(.serverViolation("bytes sent in clear after the STARTTLS acknowledgement"))
            promise.fail(closedError!)
            return promise.futureResult
        }
        do {
            let handler = try NIOSSLClientHandler(context: sslContext, serverHostname: hostname.flatMap { $0.isIPAddress ? nil : $0 })
            try context.pipeline.syncOperations.addHandler(handler, position: .first)
            // Before the TLS handler: it sees the server's first TLS bytes as they arrive.
            let observer = ServerHelloObserver()
            try context.pipeline.syncOperations.addHandler(observer, position: .first)
            serverHelloObserver = observer
        } catch {
            fatal(NBDError(.tlsFailed, "cannot start TLS", connectionUsable: false, underlying: error))
            promise.fail(closedError!)
            return promise.futureResult
        }
        tlsHandshake = promise
        armTimeout("the TLS handshake did not complete")
        return promise.futureResult
    }

    // MARK: Negotiation

    /// Sends an option and answers with every reply to it, the final one last.
    func send(_ request: OptionRequest) -> EventLoopFuture<[OptionReply.Body]> {
        let promise = handshake.futureResult.eventLoop.makePromise(of: [OptionReply.Body].self)
        if let closedError { promise.fail(closedError); return promise.futureResult }
        do {
            try negotiation.optionSent(request)
        } catch {
            promise.fail(error)
            return promise.futureResult
        }
        logger.debug("sending option", metadata: ["option": "\(request.code)"])
        pendingOption = (request.code, promise)
        armTimeout("the server did not answer \(request.code)")
        write { request.encode(into: &$0) }
        return promise.futureResult
    }

    /// Sends `NBD_OPT_EXPORT_NAME`; the answer is the export's size and flags.
    func sendExportName(_ name: String) -> EventLoopFuture<ExportNameReply> {
        let promise = handshake.futureResult.eventLoop.makePromise(of: ExportNameReply.self)
        if let closedError { promise.fail(closedError); return promise.futureResult }
        do {
            try negotiation.optionSent(.exportName(name))
        } catch {
            promise.fail(error)
            return promise.futureResult
        }
        logger.debug("sending option", metadata: ["option": "NBD_OPT_EXPORT_NAME", "export": "\(name)"])
        pendingExportName = promise
        armTimeout("the server did not answer NBD_OPT_EXPORT_NAME")
        write { OptionRequest.exportName(name).encode(into: &$0) }
        return promise.futureResult
    }

    /// What the negotiation agreed so far.
    var negotiated: ClientNegotiationStateMachine.Negotiated { negotiation.negotiated }

    /// Enters the transmission phase with what was negotiated. Called right after GO's ACK or
    /// EXPORT_NAME's answer, before any other byte is read.
    private func startTransmission() {
        let contexts = negotiation.transmissionMetaContexts
        transmission = ClientTransmissionStateMachine(configuration: .init(
            structuredReplies: negotiation.negotiated.structuredReplies,
            metaContextIDs: Set(contexts.map(\.id))))
        logger.debug("transmission phase", metadata: ["structured": "\(negotiation.negotiated.structuredReplies)", "contexts": "\(contexts.map(\.name))"])
    }

    private func negotiate(_ bytes: inout ByteBuffer) {
        do {
            while true {
                switch try negotiation.receive(&bytes) {
                case .wait:
                    return
                case .sendClientFlags(let flags):
                    logger.debug("handshake", metadata: ["serverFlags": "\(negotiation.serverFlags.rawValue)", "clientFlags": "\(flags.rawValue)"])
                    disarmTimeout()
                    write { $0.writeInteger(flags.rawValue) }
                    handshake.succeed(negotiation.serverFlags)
                case .optionCompleted(let option, let replies):
                    logger.debug("option reply", metadata: ["option": "\(option)", "reply": "\(replies.last.map { "\($0)" } ?? "")"])
                    disarmTimeout()
                    if negotiation.isInTransmission { startTransmission() }
                    let pending = pendingOption
                    pendingOption = nil
                    pending?.promise.succeed(replies)
                    if negotiation.isInTransmission { return }
                case .exportNameAccepted(let reply):
                    disarmTimeout()
                    startTransmission()
                    let pending = pendingExportName
                    pendingExportName = nil
                    pending?.succeed(reply)
                    return
                }
            }
        } catch {
            fatal(error)
        }
    }

    // MARK: Transmission

    /// Sends requests now, or queues them while `maximumInFlight` requests are out; one flush
    /// for all that were sent.
    func submit(_ requests: [PendingRequest]) {
        var sent = false
        for request in requests {
            if let closedError {
                request.fail(closedError)
            } else if disconnectRequested != nil {
                request.fail(NBDError(.connectionClosed, "the export is disconnecting", connectionUsable: false))
            } else if transmission!.inFlightCount < maximumInFlight && queued.isEmpty {
                send(request)
                sent = true
            } else {
                queued.append(request)
            }
        }
        if sent { context?.flush() }
    }

    /// The caller stopped waiting: an unsent request is dropped, a sent one answered now
    /// with `CancellationError` while its reply is still read and discarded.
    func cancel(_ request: PendingRequest) {
        if let index = queued.firstIndex(where: { $0 === request }) {
            queued.remove(at: index)
        }
        request.fail(CancellationError())
    }

    /// Soft disconnect: once the requests in flight are answered, send `NBD_CMD_DISC` and close.
    func disconnect() -> EventLoopFuture<Void> {
        guard let context else { return handshake.futureResult.eventLoop.makeSucceededVoidFuture() }
        if let disconnectRequested { return disconnectRequested.futureResult }
        let promise = context.eventLoop.makePromise(of: Void.self)
        disconnectRequested = promise
        if closedError != nil {
            promise.succeed(())
        } else if transmission == nil {
            // Still negotiating: the soft disconnect of that phase is NBD_OPT_ABORT.
            abortNegotiation(promise)
        } else {
            disconnectIfIdle()
        }
        return promise.futureResult
    }

    /// Hard disconnect: close the socket now.
    func close() {
        context?.close(promise: nil)
    }

    private func abortNegotiation(_ promise: EventLoopPromise<Void>) {
        guard negotiation.canSendOption, let context else {
            context?.close(promise: nil)
            promise.succeed(())
            return
        }
        let channel = context.channel
        send(.abort).whenComplete { _ in
            // "This MUST be followed by the client shutting down TLS (if it is running), and the client dropping the connection."
            channel.close(promise: nil)
        }
        channel.closeFuture.whenComplete { _ in promise.succeed(()) }
    }

    private func disconnectIfIdle() {
        guard let promise = disconnectRequested, let context, transmission!.inFlightCount == 0, queued.isEmpty, closedError == nil else { return }
        logger.debug("sending NBD_CMD_DISC")
        let disc = PendingRequest(.disconnect, flags: [], offset: 0, length: 0, promise: context.eventLoop.makePromise())
        let header = transmission!.startRequest(.disconnect, offset: 0, length: 0, context: disc)
        disc.succeed()  // NBD_CMD_DISC has no reply.
        // "A client MUST NOT send anything to the server after sending an NBD_CMD_DISC command."
        closedError = NBDError(.connectionClosed, "the export was disconnected", connectionUsable: false)
        var buffer = context.channel.allocator.buffer(capacity: RequestHeader.size)
        header.encode(into: &buffer)
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(buffer)).whenComplete { _ in
            channel.close(promise: nil)
        }
        channel.closeFuture.whenComplete { _ in promise.succeed(()) }
    }

    private func send(_ request: PendingRequest) {
        guard let context else { return }
        let header = transmission!.startRequest(request.type, flags: request.flags, offset: request.offset, length: request.length, context: request)
        logger.trace("request", metadata: ["command": "\(request.type)", "cookie": "\(header.cookie)", "offset": "\(request.offset)", "length": "\(request.length)"])
        var buffer = context.channel.allocator.buffer(capacity: RequestHeader.size)
        header.encode(into: &buffer)
        context.write(wrapOutboundOut(buffer), promise: nil)
        for buffer in request.takePayload() {
            context.write(wrapOutboundOut(buffer), promise: nil)
        }
    }

    private func runTransmission() {
        var sent = false
        while let action = transmission!.next() {
            switch action {
            case .data(let request, let offset, let bytes):
                request.destination?.write(bytes, at: offset)  // nil once the caller stopped waiting
            case .hole(let request, let offset, let length):
                request.destination?.zero(at: offset, length: Int(length))
            case .blockStatus(let request, let id, let descriptors):
                request.extents[id] = descriptors
            case .complete(let request, let error):
                logger.trace("reply", metadata: ["command": "\(request.type)", "error": "\(error.map { "\($0)" } ?? "none")"])
                if let error {
                    if error.serverErrno == .ESHUTDOWN {
                        // "If the client receives an NBD_ESHUTDOWN error it MUST initiate a soft disconnect."
                        _ = disconnect()
                    }
                    request.fail(error)
                } else {
                    request.succeed()
                }
                while !queued.isEmpty, transmission!.inFlightCount < maximumInFlight, !transmission!.hasFailed {
                    send(queued.removeFirst())
                    sent = true
                }
            case .fatal(let error, let requests):
                logger.debug("fatal", metadata: ["error": "\(error)"])
                fail(requests, error)
                fatal(error)
                return
            }
        }
        if sent { context?.flush() }
        disconnectIfIdle()
    }

    // MARK: Ends

    /// The server broke the protocol: fail everything and drop the connection (hard disconnect).
    private func fatal(_ error: NBDError) {
        shutDown(error)
        context?.close(promise: nil)
    }

    private func shutDown(_ reason: NBDError) {
        guard !isShutDown else { return }
        isShutDown = true
        disarmTimeout()
        let error = closedError ?? reason
        closedError = error
        negotiation.close()
        handshake.fail(error)
        pendingOption?.promise.fail(error)
        pendingOption = nil
        pendingExportName?.fail(error)
        pendingExportName = nil
        tlsHandshake?.fail(error)
        tlsHandshake = nil
        if case .fatal(_, let requests)? = transmission?.connectionClosed(error) {
            fail(requests, error)
        }
        fail(Array(queued), error)
        queued.removeAll()
    }

    private func fail(_ requests: [PendingRequest], _ error: NBDError) {
        for request in requests { request.fail(error) }
    }

    private func write(_ encode: (inout ByteBuffer) -> Void) {
        guard let context else { return }
        var buffer = context.channel.allocator.buffer(capacity: 64)
        encode(&buffer)
        context.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
    }
}

extension String {
    /// An IPv4 or IPv6 literal, which is no name for SNI.
    var isIPAddress: Bool { (try? SocketAddress(ipAddress: self, port: 0)) != nil }
}
