import Foundation
import NBD
import NIOCore
import Testing

@Suite("Interop: qemu-nbd", .serialized)
struct QemuNBDTests {
    /// Starts qemu-nbd on `image`, shared by up to 4 clients (ours and nbdinfo's).
    func serve(_ server: ServerProcess, _ image: String, format: String, extra: [String] = []) async throws -> NBDURI {
        let socket = server.path("qemu.sock")
        try await server.start("qemu-nbd", ["-f", format, "-k", socket, "-x", "disk", "-t", "-e", "4"] + extra + [image], waitFor: socket)
        return NBDURI(socket: socket, exportName: "disk")
    }

    @Test func rawFileWalkthrough() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        _ = try server.run("qemu-img", ["create", "-f", "raw", "disk.raw", "64M"])
        let uri = try await serve(server, server.path("disk.raw"), format: "raw")
        try await walkthrough(server, uri, listed: ["disk"])
    }

    @Test func qcow2Walkthrough() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        _ = try server.run("qemu-img", ["create", "-f", "qcow2", "disk.qcow2", "64M"])
        let uri = try await serve(server, server.path("disk.qcow2"), format: "qcow2")
        try await walkthrough(server, uri, listed: ["disk"], seed: 11)
    }

    @Test func dirtyBitmapReadThroughItsContext() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        _ = try server.run("qemu-img", ["create", "-f", "qcow2", "disk.qcow2", "64M"])
        _ = try server.run("qemu-img", ["bitmap", "--add", "disk.qcow2", "b0"])
        _ = try server.run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x55 1M 128k", "-c", "write -P 0x66 8M 64k", "disk.qcow2"])
        let uri = try await serve(server, server.path("disk.qcow2"), format: "qcow2", extra: ["-B", "b0"])
        var configuration = NBDClientConfiguration()
        configuration.metaContexts = ["base:allocation", "qemu:dirty-bitmap:b0"]
        let export = try await NBDExport.connect(to: uri, configuration: configuration)
        #expect(Set(export.metaContexts.map(\.name)) == ["base:allocation", "qemu:dirty-bitmap:b0"])
        let dirty = try await mapExport(export, context: "qemu:dirty-bitmap:b0")
        #expect(dirty == (try nbdinfoMap(server, uri, context: "qemu:dirty-bitmap:b0")))
        #expect(dirty.contains { $0.type == 1 && $0.offset <= 1 << 20 && $0.offset + $0.length >= (1 << 20) + 131072 })
        let status = try await export.blockStatus(at: 1 << 20, length: 4096)
        #expect(status["qemu:dirty-bitmap:b0"]?.first?.status == .dirtyBitmap(dirty: true))
        let data = try await export.read(at: 1 << 20, length: 131072)
        #expect(data.readableBytesView.allSatisfy { $0 == 0x55 })
        await export.disconnect()
    }

    @Test func unknownExportIsRefusedWithTheServersMessage() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        _ = try server.run("qemu-img", ["create", "-f", "raw", "disk.raw", "1M"])
        let uri = try await serve(server, server.path("disk.raw"), format: "raw")
        let connection = try await NBDConnection.connect(to: uri.address)
        do {
            _ = try await connection.info("nope")
            Issue.record("INFO on an unknown export should fail")
        } catch let error as NBDError {
            #expect(error.code == .optionRejected)
            #expect(error.optionReply == .errUnknown)
            #expect(error.serverMessage?.isEmpty == false)
            #expect(error.connectionUsable)
        }
        // Negotiation goes on after a refused option.
        #expect(try await connection.info("disk").size == 1 << 20)
        await connection.abort()
    }
}
