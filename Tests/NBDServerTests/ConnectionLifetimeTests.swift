import Foundation
import NIOConcurrencyHelpers
import NIOCore
import TestSupport
import Testing

@testable import NBD
@testable import NBDServer

/// A closed connection frees its channel handler on both sides: each handler kept its context,
/// which keeps the handler, so that every connection ever made stayed in memory with its
/// buffers until the handlers let go of the context when the pipeline is torn down.
@Suite("Connection lifetime")
struct ConnectionLifetimeTests {
    @Test func aClosedConnectionLetsGoOfItsHandlers() async throws {
        let socket = FileManager.default.temporaryDirectory.appendingPathComponent("nbd-lifetime-\(UUID().uuidString.prefix(8)).sock").path
        let server = try await NBDServer.start(exports: [NBDServerExport(backend: MemoryBackend(size: 1 << 20))], on: .unix(path: socket))
        let client = WeakReference()
        let served = WeakReference()
        do {
            let export = try await NBDExport.connect(to: NBDURI(socket: socket))
            #expect(try await export.read(at: 0, length: 4096) == ByteBuffer(repeating: 0, count: 4096))
            try await export.channel.eventLoop.submit { [handler = export.handler] in client.object = handler.value }.get()
            let connection = try #require(server.connections.all.first)
            try await connection.eventLoop.submit {
                served.object = try connection.pipeline.syncOperations.handler(type: NBDServerChannelHandler.self)
            }.get()
            #expect(client.object != nil && served.object != nil)
            await export.disconnect()
        }
        try await waitUntil(
            "both handlers to be freed",
            seen:
                "the client's handler \(client.object == nil ? "freed" : "alive"), the server's \(served.object == nil ? "freed" : "alive")"
        ) { client.object == nil && served.object == nil }
        await server.shutdown()
        try? FileManager.default.removeItem(atPath: socket)
    }
}

/// No backend call outlives the server: a client that sends a request to a slow backend and
/// vanishes leaves the call running, and the server's stop, by ``NBDServer/shutdown()``, by
/// cancelling ``NBDServer/run()`` or by ``NBDServer/close()``, returns only after it returned.
@Suite("Backend calls end before the server's stop")
struct BackendCallLifetimeTests {
    /// Memory whose reads take a second, counting the reads begun and those returned.
    struct SlowBackend: NBDServerBackend {
        let inner = MemoryBackend(size: 1 << 20)
        let begun = NIOLockedValueBox(0)
        let returned = NIOLockedValueBox(0)
        var size: UInt64 { inner.size }
        var isReadOnly: Bool { false }
        var flushCoversAllConnections: Bool { true }
        var zeroIsFast: Bool { true }
        func read(at offset: UInt64, length: Int) async throws -> ByteBuffer {
            begun.withLockedValue { $0 += 1 }
            defer { returned.withLockedValue { $0 += 1 } }
            // Slow on purpose: the call runs on after its client has gone, and after the stop began.
            try? await Task.sleep(for: .seconds(1))
            return try await inner.read(at: offset, length: length)
        }
        func write(_ data: ByteBuffer, at offset: UInt64, fua: Bool) async throws {}
        func flush() async throws {}
        func trim(at offset: UInt64, length: UInt64) async throws {}
        func zero(at offset: UInt64, length: UInt64, noHole: Bool) async throws {}
        func extents(at offset: UInt64, length: UInt64) async throws -> [BlockDescriptor] {
            try await inner.extents(at: offset, length: length)
        }
    }

    enum Stop: String, CaseIterable { case shutdown, cancelledRun, close }

    @Test(arguments: Stop.allCases)
    func aSlowCallOfAClientThatVanishedEndsBeforeTheStopReturns(stop: Stop) async throws {
        let socket = FileManager.default.temporaryDirectory.appendingPathComponent("nbd-calls-\(UUID().uuidString.prefix(8)).sock").path
        defer { try? FileManager.default.removeItem(atPath: socket) }
        let backend = SlowBackend()
        let server = try await NBDServer.start(exports: [NBDServerExport(backend: backend)], on: .unix(path: socket))
        let running = Task { try await server.run() }
        let export = try await NBDExport.connect(to: NBDURI(socket: socket))
        let read = Task { try await export.read(at: 0, length: 4096) }
        try await waitUntil("the read to reach the backend") { backend.begun.withLockedValue { $0 } == 1 }
        // The client vanishes: its socket closes with the read in flight.
        await export.close()
        _ = try? await read.value
        switch stop {
        case .shutdown: await server.shutdown()
        case .cancelledRun: running.cancel()
        case .close: await server.close()
        }
        if stop == .cancelledRun { try await running.value }
        #expect(backend.returned.withLockedValue { $0 } == 1, "the stop returned with the backend call still running")
        running.cancel()
        try await running.value
    }
}

/// A reference that does not keep its object alive, handed between threads by the test.
final class WeakReference: @unchecked Sendable {
    weak var object: AnyObject?
}
