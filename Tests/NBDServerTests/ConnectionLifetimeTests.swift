import Foundation
import NIOCore
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
        for _ in 0..<200 where client.object != nil || served.object != nil { try await Task.sleep(for: .milliseconds(10)) }
        #expect(client.object == nil, "the client's handler outlived its connection")
        #expect(served.object == nil, "the server's handler outlived its connection")
        await server.shutdown()
        try? FileManager.default.removeItem(atPath: socket)
    }
}

/// A reference that does not keep its object alive, handed between threads by the test.
final class WeakReference: @unchecked Sendable {
    weak var object: AnyObject?
}
