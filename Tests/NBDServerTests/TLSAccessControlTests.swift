import Foundation
import NBD
import NBDServer
import Testing

/// Access control fails closed: a TLS configuration whose allow-list (or client certificate
/// check) cannot be enforced is refused when the server starts, not silently ignored.
@Suite("TLS access control at start")
struct TLSAccessControlTests {
    func start(_ tls: NBDServerTLSConfiguration) async throws {
        let socket = FileManager.default.temporaryDirectory.appendingPathComponent("nbd-acl-\(UUID().uuidString.prefix(8)).sock").path
        defer { try? FileManager.default.removeItem(atPath: socket) }
        var configuration = NBDServer.Configuration()
        configuration.tls = tls
        let server = try await NBDServer.start(
            exports: [NBDServerExport(backend: MemoryBackend(size: 1 << 20))],
            on: .unix(path: socket),
            configuration: configuration
        )
        await server.shutdown()
    }

    /// With TLS off, an allow-list would let every client in clear through.
    @Test func anAllowListWithTLSOffIsRefused() async throws {
        var tls = NBDServerTLSConfiguration(mode: .off, pskFile: "/nonexistent/keys.psk")
        tls.allowedIdentities = ["alice"]
        await #expect {
            try await start(tls)
        } throws: { error in
            guard let error = error as? NBDError else { return false }
            return error.code == .tlsFailed && error.message.contains("cannot be enforced with TLS off")
        }
    }

    @Test func verifyingTheClientWithTLSOffIsRefused() async throws {
        var tls = NBDServerTLSConfiguration(mode: .off, certificates: "/nonexistent")
        tls.verifyPeer = true
        await #expect {
            try await start(tls)
        } throws: { error in
            (error as? NBDError)?.code == .tlsFailed && "\(error)".contains("needs TLS, which is off")
        }
    }

    /// TLS off with nothing asking for it still starts, in clear, whatever files it names.
    @Test func tlsOffWithoutAccessControlStarts() async throws {
        try await start(NBDServerTLSConfiguration(mode: .off, pskFile: "/nonexistent/keys.psk"))
    }
}
