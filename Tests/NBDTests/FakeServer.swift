import Foundation
import NBD
@_spi(NBDMachines) import NBDCore
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Testing

/// A scripted NBD server on a temporary Unix socket (or on loopback TCP): each test plays the
/// server's side byte by byte, so it can misbehave in exactly the way under test.
final class FakeServer: Sendable {
    let path: String
    private let channel: Channel
    private let accepted = NIOLockedValueBox<(peers: [Peer], waiters: [CheckedContinuation<Peer, Never>])>(([], []))
    let address: NBDAddress
    var connectionCount: Int { accepted.withLockedValue { $0.peers.count } }

    init(overTCP: Bool = false) async throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("nbd-fake-\(UUID().uuidString.prefix(8)).sock").path
        self.path = path
        let box = NIOLockedValueBox<FakeServer?>(nil)
        let bootstrap = ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let peer = Peer(channel: channel)
                    try channel.pipeline.syncOperations.addHandler(PeerHandler(peer: peer))
                    box.withLockedValue { $0 }?.accept(peer)
                }
            }
        if overTCP {
            channel = try await bootstrap.bind(host: "127.0.0.1", port: 0).get()
            address = .tcp(host: "127.0.0.1", port: channel.localAddress!.port!)
        } else {
            channel = try await bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).get()
            address = .unix(path: path)
        }
        box.withLockedValue { $0 = self }
    }

    private func accept(_ peer: Peer) {
        let waiter = accepted.withLockedValue { state -> CheckedContinuation<Peer, Never>? in
            state.peers.append(peer)
            return state.waiters.isEmpty ? nil : state.waiters.removeFirst()
        }
        waiter?.resume(returning: peer)
    }

    /// The next connection (the first one not yet handed out).
    func nextPeer(index: Int = 0) async -> Peer {
        await withCheckedContinuation { continuation in
            let peer = accepted.withLockedValue { state -> Peer? in
                if state.peers.count > index { return state.peers[index] }
                state.waiters.append(continuation)
                return nil
            }
            if let peer { continuation.resume(returning: peer) }
        }
    }

    func stop() async {
        try? await channel.close()
        try? FileManager.default.removeItem(atPath: path)
    }
}

/// The server's end of one connection.
final class Peer: Sendable {
    let channel: Channel
    private struct State {
        var buffer = ByteBuffer()
        var closed = false
        var waiter: (count: Int, continuation: CheckedContinuation<ByteBuffer, any Error>)?

        /// The next `count` bytes, copied out: a slice would share storage with `buffer`, which
        /// the event loop grows in place once the slice is dropped on a test task, with no
        /// order between the two threads that ThreadSanitizer can see.
        mutating func take(_ count: Int) -> ByteBuffer {
            ByteBuffer(bytes: buffer.readBytes(length: count)!)
        }
    }
    private let state = NIOLockedValueBox(State())

    init(channel: Channel) { self.channel = channel }

    fileprivate func received(_ bytes: ByteBuffer) {
        var bytes = bytes
        let resume = state.withLockedValue { state -> (CheckedContinuation<ByteBuffer, any Error>, ByteBuffer)? in
            state.buffer.writeBuffer(&bytes)
            guard let waiter = state.waiter, state.buffer.readableBytes >= waiter.count else { return nil }
            state.waiter = nil
            return (waiter.continuation, state.take(waiter.count))
        }
        resume.map { $0.0.resume(returning: $0.1) }
    }

    fileprivate func clientClosed() {
        let waiter = state.withLockedValue { state -> CheckedContinuation<ByteBuffer, any Error>? in
            state.closed = true
            defer { state.waiter = nil }
            return state.waiter?.continuation
        }
        waiter?.resume(throwing: FakeServerError.clientClosed)
    }

    /// Bytes received and not yet read.
    var available: Int { state.withLockedValue { $0.buffer.readableBytes } }
    /// Whether the client closed its side.
    var isClosed: Bool { state.withLockedValue { $0.closed } }

    /// Exactly `count` bytes from the client.
    func read(_ count: Int) async throws -> ByteBuffer {
        try await withCheckedThrowingContinuation { continuation in
            let ready = state.withLockedValue { state -> Result<ByteBuffer, any Error>? in
                if state.buffer.readableBytes >= count { return .success(state.take(count)) }
                if state.closed { return .failure(FakeServerError.clientClosed) }
                state.waiter = (count, continuation)
                return nil
            }
            ready.map { continuation.resume(with: $0) }
        }
    }

    func send(_ encode: (inout ByteBuffer) -> Void) async throws {
        var buffer = channel.allocator.buffer(capacity: 64)
        encode(&buffer)
        try await channel.writeAndFlush(buffer)
    }

    func close() async { try? await channel.close() }

    // MARK: The NBD steps most scripts share

    /// Sends a fixed-newstyle greeting with NO_ZEROES and reads the client flags.
    func handshake() async throws {
        try await send { ServerGreeting.newstyle([.fixedNewstyle, .noZeroes]).encode(into: &$0) }
        var flags = try await read(4)
        #expect(flags.readInteger(as: UInt32.self) == 3)
    }

    func readOption() async throws -> OptionRequest {
        let header = try await read(16)
        let length = header.getInteger(at: 12, as: UInt32.self)!
        var whole = header
        var data = try await read(Int(length))
        whole.writeBuffer(&data)
        return try #require(try OptionRequest.decode(from: &whole))
    }

    func reply(_ option: OptionCode, _ body: OptionReply.Body) async throws {
        try await send { OptionReply(option: option, body: body).encode(into: &$0) }
    }

    /// Answers GO (or INFO) for a 1 MiB export with the given flags.
    func acceptGo(size: UInt64 = 1 << 20, flags: TransmissionFlags = [.hasFlags, .sendFlush]) async throws {
        let option = try await readOption()
        #expect(option.code == .go)
        try await reply(.go, .info(.export(size: size, flags: flags)))
        try await reply(.go, .ack)
    }

    func readRequest() async throws -> RequestHeader {
        var bytes = try await read(RequestHeader.size)
        return try #require(try RequestHeader.decode(from: &bytes))
    }
}

enum FakeServerError: Error { case clientClosed }

private final class PeerHandler: ChannelInboundHandler, Sendable {
    typealias InboundIn = ByteBuffer
    let peer: Peer
    init(peer: Peer) { self.peer = peer }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) { peer.received(unwrapInboundIn(data)) }
    func channelInactive(context: ChannelHandlerContext) { peer.clientClosed() }
}
