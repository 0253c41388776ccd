import NIOCore

/// Reads, in passing, the cipher suite the server picks in its TLS ServerHello: swift-nio-ssl
/// does not report the negotiated cipher. It sits before the TLS handler, hands every byte on
/// untouched, looks at no more than the first few dozen bytes, and then leaves the pipeline.
final class ServerHelloObserver: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    /// The cipher suite's code point, once seen.
    private(set) var cipherSuite: UInt16?
    private var seen = ByteBuffer()
    private var isDone = false

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if !isDone {
            let bytes = unwrapInboundIn(data)
            var head = bytes.getSlice(
                at: bytes.readerIndex,
                length: min(bytes.readableBytes, TLSServerHello.longestPrefix - seen.readableBytes)
            )!
            seen.writeBuffer(&head)
            switch TLSServerHello.cipherSuite(in: seen) {
            case .needMore where seen.readableBytes < TLSServerHello.longestPrefix:
                break
            case .found(let suite):
                cipherSuite = suite
                isDone = true
            case .needMore, .notServerHello:
                isDone = true
            }
        }
        context.fireChannelRead(data)
        if isDone {
            seen = ByteBuffer()
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        }
    }
}
