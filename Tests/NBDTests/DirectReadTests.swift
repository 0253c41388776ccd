import Foundation
@_spi(NBDMachines) import NBDCore
import NIOCore
import NIOPosix
import TestSupport
import Testing

@testable import NBD

/// Over a socket in clear the client reads READ data itself, straight into the destination
/// (DirectRead). Scripted servers send the data in irregular pieces with pauses, so that
/// direct reads stop part way and resume on the next readable event, close part way, and
/// answer a read nobody waits for any more.
@Suite("Direct reads")
struct DirectReadTests {
    static let length = 512 << 10
    static func pattern(_ offset: UInt64, _ count: Int) -> ByteBuffer {
        // The bytes repeat every 7 * 256.
        ByteBuffer(
            bytes: repeatedCycle((0..<min(count, 1792)).map { UInt8(truncatingIfNeeded: (Int(offset) + $0) * 31 / 7 + 1) }, count: count)
        )
    }

    func withServer(overTCP: Bool = false, _ body: (FakeServer) async throws -> Void) async throws {
        let server = try await FakeServer(overTCP: overTCP)
        do { try await body(server) } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }

    /// A successful simple reply to `request` carrying `count` bytes of the pattern (all of
    /// the request's by default).
    func simpleReply(to request: RequestHeader, count: Int? = nil) -> ByteBuffer {
        var reply = ByteBuffer()
        ReplyHeader.simple(SimpleReplyHeader(cookie: request.cookie)).encode(into: &reply)
        reply.writeImmutableBuffer(Self.pattern(request.offset, count ?? Int(request.length)))
        return reply
    }

    /// Sends `data` in pieces of the given sizes (the rest last), pausing between them.
    func drip(_ data: ByteBuffer, to peer: Peer, sizes: [Int]) async throws {
        var rest = data
        for size in sizes + [rest.readableBytes] where rest.readableBytes > 0 {
            let piece = rest.readSlice(length: min(size, rest.readableBytes))!
            try await peer.send { $0.writeImmutableBuffer(piece) }
            // A pause on purpose, so that the pieces tend to arrive apart.
            try await Task.sleep(for: .milliseconds(2))
        }
    }

    @Test(arguments: [false, true])
    func dataInPiecesLandsWholeInEveryKindOfRead(overTCP: Bool) async throws {
        try await withServer(overTCP: overTCP) { server in
            let client = Task { () -> ([ByteBuffer], Int) in
                let connection = try await NBDConnection.connect(to: server.address)
                let export = try await connection.go()
                async let into: ByteBuffer = {
                    var buffer = ByteBuffer(string: "kept")
                    try await export.read(into: &buffer, at: 0, length: UInt64(Self.length))
                    return buffer
                }()
                async let fresh = export.read(at: UInt64(Self.length), length: UInt64(Self.length))
                async let segments = export.readSegments(at: UInt64(2 * Self.length), length: UInt64(Self.length))
                var joined = ByteBuffer()
                for segment in try await segments { joined.writeImmutableBuffer(segment) }
                let results = [try await into, try await fresh, joined]
                let direct = await export.bytesReadDirectly
                await export.disconnect()
                return (results, direct)
            }
            let peer = await server.nextPeer()
            try await peer.handshake()
            try await peer.acceptGo(size: 4 << 20)
            var requests: [RequestHeader] = []
            for _ in 0..<3 { requests.append(try await peer.readRequest()) }
            // Answered last to first, each header with the start of its data, then the rest
            // in pieces large and small.
            for request in requests.sorted(by: { $0.offset > $1.offset }) {
                try await drip(simpleReply(to: request), to: peer, sizes: [16 + 100, 1, 70_000, 3, 200_000, 4095])
            }
            #expect(try await peer.readRequest().type == .disconnect)
            let (results, direct) = try await client.value
            var expectedInto = ByteBuffer(string: "kept")
            expectedInto.writeImmutableBuffer(Self.pattern(0, Self.length))
            #expect(results[0] == expectedInto)
            #expect(results[1] == Self.pattern(UInt64(Self.length), Self.length))
            #expect(results[2] == Self.pattern(UInt64(2 * Self.length), Self.length))
            // Most of the data skipped SwiftNIO's buffers.
            #expect(direct > 3 * Self.length / 2)
        }
    }

    @Test func structuredChunksInAnyOrderAreReadDirectlyAndChecked() async throws {
        try await withServer { server in
            let client = Task { () -> (ByteBuffer, Int) in
                let connection = try await NBDConnection.connect(to: server.address)
                #expect(try await connection.enableStructuredReplies())
                let export = try await connection.go()
                let data = try await export.read(at: 0, length: UInt64(Self.length))
                return (data, await export.bytesReadDirectly)
            }
            let peer = await server.nextPeer()
            try await peer.handshake()
            #expect(try await peer.readOption().code == .structuredReply)
            try await peer.reply(.structuredReply, .ack)
            try await peer.acceptGo(size: 4 << 20)
            let request = try await peer.readRequest()
            // The second half first, then a hole, then the first 200 000 bytes.
            let half = UInt64(Self.length / 2)
            var reply = ByteBuffer()
            ReplyHeader.structured(
                StructuredReplyHeader(flags: [], type: .offsetData, cookie: request.cookie, length: UInt32(8 + Self.length / 2))
            ).encode(into: &reply)
            reply.writeInteger(half)
            reply.writeImmutableBuffer(Self.pattern(half, Self.length / 2))
            ReplyHeader.structured(StructuredReplyHeader(flags: [], type: .offsetHole, cookie: request.cookie, length: 12)).encode(
                into: &reply
            )
            reply.writeMultipleIntegers(UInt64(200_000), UInt32(half) - 200_000)
            ReplyHeader.structured(StructuredReplyHeader(flags: .done, type: .offsetData, cookie: request.cookie, length: 8 + 200_000))
                .encode(into: &reply)
            reply.writeInteger(UInt64(0))
            reply.writeImmutableBuffer(Self.pattern(0, 200_000))
            try await drip(reply, to: peer, sizes: [10, 30_000, 1, 150_000, 80_000, 7, 70_000])
            let (data, direct) = try await client.value
            var expected = Self.pattern(0, 200_000)
            expected.writeRepeatingByte(0, count: Int(half) - 200_000)
            expected.writeImmutableBuffer(Self.pattern(half, Self.length / 2))
            #expect(data == expected)
            #expect(direct > 200_000)
        }
    }

    @Test func serverClosingDuringTheDataFailsTheReadAndLeavesTheBuffer() async throws {
        try await withServer { server in
            let client = Task { () -> (any Error)? in
                let connection = try await NBDConnection.connect(to: server.address)
                let export = try await connection.go()
                var buffer = ByteBuffer(string: "kept")
                do {
                    try await export.read(into: &buffer, at: 0, length: UInt64(Self.length))
                    return nil
                } catch {
                    #expect(buffer == ByteBuffer(string: "kept"))
                    return error
                }
            }
            let peer = await server.nextPeer()
            try await peer.handshake()
            try await peer.acceptGo(size: 4 << 20)
            let request = try await peer.readRequest()
            try await drip(simpleReply(to: request, count: 300_000), to: peer, sizes: [8192, 100_000])
            await peer.close()
            let error = try #require(try await client.value as? NBDError)
            #expect(error.code == .connectionClosed)
            #expect(!error.connectionUsable)
        }
    }

    @Test func aReadNobodyWaitsForIsDrainedAndTheConnectionGoesOn() async throws {
        try await withServer { server in
            let connected = Task { () -> NBDExport in
                let connection = try await NBDConnection.connect(to: server.address)
                return try await connection.go()
            }
            let peer = await server.nextPeer()
            try await peer.handshake()
            try await peer.acceptGo(size: 4 << 20)
            let export = try await connected.value
            let abandoned = Task { try await export.read(at: 0, length: UInt64(Self.length)) }
            let first = try await peer.readRequest()
            abandoned.cancel()
            await #expect(throws: CancellationError.self) { try await abandoned.value }
            // The late reply, then one for a read still wanted.
            try await drip(simpleReply(to: first), to: peer, sizes: [1000, 100_000])
            let wanted = Task { try await export.read(at: 4096, length: 65_536) }
            let second = try await peer.readRequest()
            try await drip(simpleReply(to: second), to: peer, sizes: [20, 30_000])
            #expect(try await wanted.value == Self.pattern(4096, 65_536))
        }
    }

    @Test func turnedOffSwiftNIOReadsEveryByte() async throws {
        try await withServer { server in
            let client = Task { () -> (ByteBuffer, Int) in
                var configuration = NBDClientConfiguration()
                configuration.readsDataDirectly = false
                let connection = try await NBDConnection.connect(to: server.address, configuration: configuration)
                let export = try await connection.go()
                var buffer = ByteBuffer()
                try await export.read(into: &buffer, at: 0, length: UInt64(Self.length))
                return (buffer, await export.bytesReadDirectly)
            }
            let peer = await server.nextPeer()
            try await peer.handshake()
            try await peer.acceptGo(size: 4 << 20)
            let request = try await peer.readRequest()
            try await drip(simpleReply(to: request), to: peer, sizes: [16 + 100, 70_000, 200_000])
            let (data, direct) = try await client.value
            #expect(data == Self.pattern(0, Self.length))
            #expect(direct == 0)
        }
    }

    // MARK: Dialing, now done by the client itself

    @Test func aRefusedConnectionSaysWhereAndWhy() async throws {
        // A port bound and not listening: connections are refused.
        try await withRefusingLoopbackPort { port in
            await #expect(
                performing: { _ = try await NBDConnection.connect(to: .tcp(host: "127.0.0.1", port: port)) },
                throws: { error in
                    let error = error as? NBDError
                    return error?.code == .connectFailed && error?.message == "cannot connect to 127.0.0.1:\(port): Connection refused"
                }
            )
        }
        let missing = FileManager.default.temporaryDirectory.appendingPathComponent("nbd-missing-\(UUID().uuidString.prefix(8)).sock").path
        await #expect(
            performing: { _ = try await NBDConnection.connect(to: .unix(path: missing)) },
            throws: { error in
                (error as? NBDError)?.message == "cannot connect to unix:\(missing): No such file or directory"
            }
        )
    }

    @Test func aNameIsResolved() async throws {
        try await withServer(overTCP: true) { server in
            guard case .tcp(_, let port) = server.address else {
                Issue.record("not TCP")
                return
            }
            let connected = Task { try await NBDConnection.connect(to: .tcp(host: "localhost", port: port)).go() }
            let peer = await server.nextPeer()
            try await peer.handshake()
            try await peer.acceptGo()
            #expect(try await connected.value.size == 1 << 20)
        }
    }
}
