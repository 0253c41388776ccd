import Logging
import NBDCore
import NBDEventLoop
import NIOCore

/// One client connection: feeds the client's bytes to a ``ServerConnectionStateMachine`` and
/// performs what it decides; requests run concurrently, each answered as soon as its backend
/// call completes.
final class NBDServerChannelHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private var machine: ServerConnectionStateMachine
    private var context: ChannelHandlerContext?
    private let backends: [String: any NBDServerBackend]
    private var backend: (any NBDServerBackend)?
    private let logger: Logger
    /// Requests run on the connection's own thread: a memory backend answers without a hop.
    private var executor: EventLoopTaskExecutor?

    init(exports: [NBDServerExport], configuration: NBDServer.Configuration, logger: Logger) {
        machine = ServerConnectionStateMachine(
            exports: exports.map { export in
                var flags: TransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendCache]
                if export.backend.isReadOnly {
                    flags.insert(.readOnly)
                } else {
                    flags.formUnion([.sendTrim, .sendWriteZeroes, .sendFastZero])
                }
                if export.backend.flushCoversAllConnections { flags.insert(.canMultiConn) }
                return .init(
                    name: export.name,
                    description: export.description,
                    size: export.backend.size,
                    flags: flags,
                    blockSizes: BlockSizeConstraints(minimum: 1, preferred: 4096, maximum: UInt32(configuration.maximumPayload))
                )
            },
            maximumOptionLength: configuration.maximumOptionLength,
            limits: .init(maximumPayload: configuration.maximumPayload, maximumRequestsInFlight: configuration.maximumRequestsInFlight)
        )
        backends = Dictionary(exports.map { ($0.name, $0.backend) }, uniquingKeysWith: { first, _ in first })
        self.logger = logger
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        executor = EventLoopTaskExecutor(context.eventLoop)
    }

    func channelActive(context: ChannelHandlerContext) {
        logger.info("client connected", metadata: ["peer": "\(context.remoteAddress.map { "\($0)" } ?? "?")"])
        machine.channelActive()
        run()
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        logger.info("client disconnected")
        machine.channelClosed()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        logger.warning("connection error", metadata: ["error": "\(error)"])
        machine.channelClosed()
        context.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        machine.bytesReceived(unwrapInboundIn(data))
        run()
    }

    /// The server is stopping: see ``ServerConnectionStateMachine/shutdownRequested()``.
    func shutDown() {
        machine.shutdownRequested()
        run()
    }

    /// Performs every action the machine has for now.
    private func run() {
        guard let context else { return }
        var flush = false
        while let action = machine.next() {
            switch action {
            case .write(let buffers):
                for buffer in buffers { context.write(wrapOutboundOut(buffer), promise: nil) }
                flush = true
            case .writeAndClose(let bytes):
                let channel = context.channel
                context.writeAndFlush(wrapOutboundOut(bytes)).whenComplete { _ in channel.close(promise: nil) }
            case .transmissionStarted(let agreement):
                backend = backends[agreement.export.name]
                logger.info(
                    "export opened",
                    metadata: ["export": "\(agreement.export.name)", "structured": "\(agreement.structuredReplies)"]
                )
            case .perform(let request, let data, let sparse):
                perform(request, data: data, sparse: sparse, context: context)
            case .close:
                context.close(promise: nil)
            case .fatal(let error):
                // A client that breaks the protocol gets a hard disconnect, and nothing else.
                logger.warning("closing a misbehaving client", metadata: ["error": "\(error)"])
                context.close(promise: nil)
            }
        }
        if flush { context.flush() }
    }

    private func perform(_ request: RequestHeader, data: [ByteBuffer], sparse: Bool, context: ChannelHandlerContext) {
        let backend = self.backend!
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        Task(executorPreference: executor) {
            let reply = await RequestPerformer.run(request, data: data, backend: backend, sparse: sparse)
            handler.eventLoop.runOnLoop {
                if case .failed(let errno, _) = reply {
                    handler.value.logger.debug("request failed", metadata: ["command": "\(request.type)", "error": "\(errno)"])
                }
                handler.value.machine.requestCompleted(request, reply)
                handler.value.run()
            }
        }
    }
}
