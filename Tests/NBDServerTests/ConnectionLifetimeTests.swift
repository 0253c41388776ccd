import Foundation
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

/// A reference that does not keep its object alive, handed between threads by the test.
final class WeakReference: @unchecked Sendable {
    weak var object: AnyObject?
}
