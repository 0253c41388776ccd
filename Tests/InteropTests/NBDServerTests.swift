import Foundation
import NBD
import NIOCore
import Testing

@Suite("Interop: nbd-server", .serialized)
struct NBDServerTests {
    @Test func exportFromAConfigFileWithList() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let socket = server.path("nbd-server.sock")
        let image = server.path("disk.raw")
        _ = FileManager.default.createFile(atPath: image, contents: nil)
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: image))
        try handle.truncate(atOffset: 64 << 20)
        try handle.close()
        let config = """
            [generic]
                unixsock = \(socket)
                allowlist = true
            [disk]
                exportname = \(image)
                trim = true
            [second]
                exportname = \(image)
                readonly = true
            """
        try config.write(toFile: server.path("config"), atomically: true, encoding: .utf8)
        try await server.start("nbd-server", ["-C", server.path("config"), "-d"], waitFor: socket, probe: false)
        let uri = NBDURI(socket: socket, exportName: "disk")
        let connection = try await NBDConnection.connect(to: uri.address)
        let listing = try await connection.list().map(\.name)
        #expect(Set(listing) == ["disk", "second"])
        await connection.abort()
        let contexts = try await probeContexts(uri)
        try await walkthrough(server, uri, listed: ["disk", "second"], blockStatus: contexts, sizeInInfo: false)
    }

    /// Whether this nbd-server offers base:allocation (newer versions do).
    func probeContexts(_ uri: NBDURI) async throws -> Bool {
        let connection = try await NBDConnection.connect(to: uri.address)
        var contexts: [NBDMetaContext] = []
        if try await connection.enableStructuredReplies() {
            contexts = (try? await connection.listMetaContexts(for: uri.exportName, queries: ["base:allocation"])) ?? []
        }
        await connection.abort()
        return contexts.contains { $0.name == "base:allocation" }
    }
}
