import Foundation
import NIOCore
import Testing

@testable import NBD
@testable import NBDServer

#if canImport(Glibc)
import Glibc
#endif

/// `NBDConnection.connect(socket:)`: a socket the caller opened (or a parent process handed
/// down) carries the connection from the handshake on.
@Suite("A socket opened by the caller")
struct PreopenedSocketTests {
    /// A stream socket connected to the Unix socket at `path`, as a caller would open it.
    func connectedSocket(to path: String) throws -> CInt {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: Array(path.utf8) + [0]) }
        let status = withUnsafeBytes(of: &address) { raw in
            Glibc.connect(fd, raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t(MemoryLayout<sockaddr_un>.size))
        }
        guard status == 0 else { throw NBDError.invalidArgument("connect: \(String(cString: strerror(errno)))") }
        return fd
    }

    @Test func aConnectedDescriptorCarriesTheSession() async throws {
        let socket = FileManager.default.temporaryDirectory.appendingPathComponent("nbd-fd-\(UUID().uuidString.prefix(8)).sock").path
        let server = try await NBDServer.start(
            exports: [NBDServerExport(name: "d", backend: MemoryBackend(size: 1 << 20))],
            on: .unix(path: socket)
        )
        defer { try? FileManager.default.removeItem(atPath: socket) }
        let connection = try await NBDConnection.connect(socket: try connectedSocket(to: socket))
        let export = try await connection.go("d")
        let data = ByteBuffer(bytes: (0..<8192).map { UInt8(truncatingIfNeeded: $0 * 7) })
        try await export.write(data, at: 4096)
        #expect(try await export.read(at: 4096, length: 8192) == data)
        await export.disconnect()
        await server.shutdown()
    }

    @Test func aDescriptorThatIsNoSocketFails() async throws {
        let pipe = Pipe()
        let fd = dup(pipe.fileHandleForReading.fileDescriptor)
        do {
            _ = try await NBDConnection.connect(socket: fd)
            Issue.record("a pipe carried an NBD session")
        } catch let error as NBDError {
            #expect(error.code == .connectFailed || error.code == .connectionClosed, "\(error)")
        }
    }
}
