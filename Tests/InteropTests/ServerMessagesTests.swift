import Foundation
import NBD
import NBDServer
import NIOCore
import TestSupport
import Testing

/// A backend's failure reaches the client in words: the structured error chunk carries the
/// backend's message, which libnbd 1.22 decodes (and logs; nbdcopy prints the errno alone),
/// our client returns as `serverMessage`, and `nbd copy` prints.
@Suite("The server's messages to clients", .serialized)
struct ServerMessagesTests {
    /// Memory whose second mebibyte cannot be read.
    struct FailingBackend: NBDServerBackend {
        let inner = MemoryBackend(size: 4 << 20)
        var size: UInt64 { inner.size }
        var isReadOnly: Bool { false }
        var flushCoversAllConnections: Bool { true }
        var zeroIsFast: Bool { true }
        static let message = "the disk under this export failed at 1048576"

        func read(at offset: UInt64, length: Int) async throws -> ByteBuffer {
            if offset < 2 << 20, offset + UInt64(length) > 1 << 20 { throw NBDServerError(.EIO, Self.message) }
            return try await inner.read(at: offset, length: length)
        }
        func write(_ data: ByteBuffer, at offset: UInt64, fua: Bool) async throws { try await inner.write(data, at: offset, fua: fua) }
        func flush() async throws {}
        func trim(at offset: UInt64, length: UInt64) async throws { try await inner.trim(at: offset, length: length) }
        func zero(at offset: UInt64, length: UInt64, noHole: Bool) async throws {
            try await inner.zero(at: offset, length: length, noHole: noHole)
        }
        func extents(at offset: UInt64, length: UInt64) async throws -> [BlockDescriptor] {
            // All data, so that every byte is read.
            [BlockDescriptor(length: min(length, 1 << 30), flags: 0)]
        }
    }

    @Test func aBackendsFailureIsPrintedByTheClient() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let socket = folder.path("failing.sock")
        let server = try await NBDServer.start(exports: [NBDServerExport(backend: FailingBackend())], on: .unix(path: socket))
        let uri = NBDURI(socket: socket)

        // libnbd 1.22 decodes the error chunk and logs its message (it returns the errno alone).
        let script = "h.set_debug(True); h.connect_uri('\(uri)'); h.pread(4096, 1048576)"
        let (executable, arguments) = try ServerProcess.command("trixie:nbdsh", ["-c", script], in: folder.directory)
        let nbdsh = try runProcess(executable, arguments, in: folder.directory)
        #expect(nbdsh.status != 0)
        #expect(nbdsh.error.contains(FailingBackend.message), "\(nbdsh.error)")

        let copy = try runNBD(["copy", uri.description, "null:"])
        #expect(copy.status == 1 && copy.error.contains(FailingBackend.message), "\(copy.error)")

        let export = try await NBDExport.connect(to: uri)
        await #expect {
            _ = try await export.read(at: 1 << 20, length: 4096)
        } throws: { error in
            let error = error as? NBDError
            return error?.serverErrno == .EIO && error?.serverMessage == FailingBackend.message
        }
        // The connection goes on: the failure was that request's only.
        #expect(try await export.read(at: 0, length: 4096).readableBytes == 4096)
        await export.disconnect()
        await server.shutdown()
    }
}
