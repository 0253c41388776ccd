import Foundation
import NBD
@_spi(NBDMachines) import NBDCore
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import TestSupport

/// A client that sends whatever bytes a test wants, to check how a server treats bad clients.
final class RawClient: Sendable {
    let channel: Channel
    private let received: NIOLockedValueBox<ByteBuffer>

    init(socket: String) async throws {
        // Collected from the first byte on: the greeting may come before connect() returns.
        let received = NIOLockedValueBox(ByteBuffer())
        self.received = received
        channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        Collector { bytes in
                            var bytes = bytes
                            _ = received.withLockedValue { $0.writeBuffer(&bytes) }
                        }
                    )
                }
            }
            .connect(unixDomainSocketPath: socket).get()
    }

    func send(_ encode: (inout ByteBuffer) -> Void) async throws {
        var buffer = ByteBuffer()
        encode(&buffer)
        try await channel.writeAndFlush(buffer)
    }

    /// Waits for `count` bytes and takes them.
    func read(_ count: Int) async throws -> ByteBuffer {
        var bytes: [UInt8]?
        try await waitUntil(
            "\(count) bytes from the server",
            seen: "\(self.received.withLockedValue { $0.readableBytes }) bytes, connection \(self.channel.isActive ? "open" : "closed")"
        ) {
            // Copied out under the lock: a slice would share storage that the event loop grows.
            let active = channel.isActive
            bytes = received.withLockedValue { $0.readBytes(length: count) }
            if bytes == nil, !active { throw InteropError("the server closed the connection before sending \(count) bytes") }
            return bytes != nil
        }
        return ByteBuffer(bytes: bytes!)
    }

    /// Waits for the server to close the connection; fails when it does not.
    func isClosedByServer() async throws -> Bool {
        try await waitUntil("the server to close the connection", seen: "still open") { !channel.isActive }
        return true
    }

    /// Handshake and GO on the default export, with simple replies.
    func enterTransmission() async throws {
        _ = try await read(18)
        try await send { $0.writeInteger(UInt32(3)) }
        try await send { OptionRequest.go(export: "", requests: []).encode(into: &$0) }
        while true {
            var header = try await read(20)
            let length = header.getInteger(at: 16, as: UInt32.self)!
            let type = header.getInteger(at: 12, as: UInt32.self)!
            _ = try await read(Int(length))
            header.clear()
            if type == OptionReplyType.ack.rawValue { return }
        }
    }

    /// Sends a request header and returns the simple reply's error value.
    func request(_ header: RequestHeader, payload: [UInt8] = []) async throws -> UInt32 {
        try await send {
            header.encode(into: &$0)
            $0.writeBytes(payload)
        }
        return try await simpleReply().error.rawValue
    }

    /// Waits for the next reply, which must be a simple one, and decodes its header.
    func simpleReply() async throws -> SimpleReplyHeader {
        var bytes = try await read(SimpleReplyHeader.size)
        guard case .simple(let reply)? = try ReplyHeader.decode(from: &bytes) else {
            throw InteropError("expected a simple reply, got \(bytes.readableBytesView.map { $0 })")
        }
        return reply
    }

    /// Stops reading from the socket: what the server sends next stays in the kernel.
    func stopReading() async throws {
        try await channel.setOption(.autoRead, value: false).get()
    }

    func close() async { try? await channel.close() }
}

private final class Collector: ChannelInboundHandler, Sendable {
    typealias InboundIn = ByteBuffer
    let onBytes: @Sendable (ByteBuffer) -> Void
    init(_ onBytes: @escaping @Sendable (ByteBuffer) -> Void) { self.onBytes = onBytes }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) { onBytes(unwrapInboundIn(data)) }
}
