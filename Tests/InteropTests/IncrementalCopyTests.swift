import Foundation
import NBD
import Testing

/// `nbd copy --bitmap`: an incremental backup with qemu's dirty bitmaps. A full copy, writes to
/// the qcow2 after `qemu-img bitmap --add`, then an incremental copy onto the full one equals the
/// source, and qemu-nbd's trace shows that only the dirty data was read.
@Suite("nbd copy --bitmap (incremental, qemu dirty bitmaps)", .serialized)
struct IncrementalCopyTests {
    func contents(_ path: String) throws -> Data { try Data(contentsOf: URL(fileURLWithPath: path)) }

    @Test func onlyTheDirtyExtentsAreCopied() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let image = try QemuBitmapImage(server)

        // The full copy, to a file and to an NBD export.
        let full = try await image.serveForFullCopy()
        let file = server.path("backup.raw")
        let memory = try await server.nbdkit(["memory", "64M"]).description
        for destination in [file, memory] {
            #expect(try runNBD(["copy", full.uri.description, destination]).status == 0)
        }

        // Then a bitmap, and writes: new data, and zeroes over old data.
        try await image.dirty(after: full.process)
        let (bitmapURI, trace) = try await image.serveWithBitmap()
        let uri = bitmapURI.description
        // What the source holds now, by nbdcopy.
        _ = try server.run("nbdcopy", [uri, server.path("expected.raw")])
        let expected = try contents(server.path("expected.raw"))
        #expect(expected[(10 << 20)] == 0x77 && expected[(31 << 20)] == 0)

        for (destination, name) in [(file, "qemu:dirty-bitmap:b0"), (memory, "b0")] {
            let before = qemuBytesSent(trace)
            let result = try runNBD(["copy", "--bitmap=\(name)", uri, destination])
            #expect(result.status == 0, "\(result.error)")
            // The 1 MiB of new data; the zeroed half MiB is zero in block status and not read.
            #expect(qemuBytesSent(trace) - before == 1 << 20, "\(destination)")
        }
        #expect(try contents(file) == expected)
        _ = try server.run("nbdcopy", [memory, server.path("memory.raw")])
        #expect(try contents(server.path("memory.raw")) == expected)
    }

    @Test func refusals() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let image = server.path("disk.qcow2")
        _ = try server.run("qemu-img", ["create", "-q", "-f", "qcow2", image, "1M"])
        _ = try server.run("qemu-img", ["bitmap", "--add", image, "b0"])
        let socket = server.path("q.sock")
        try await server.start("qemu-nbd", ["-k", socket, "-t", "-r", "-f", "qcow2", "-B", "b0", image], waitFor: socket)
        let uri = NBDURI(socket: socket).description
        let small = server.path("small.raw")
        _ = try server.run("truncate", ["-s", "512K", small])
        let cases: [([String], String)] = [
            (["copy", "--bitmap=b1", uri, small], "does not offer the metadata context qemu:dirty-bitmap:b1"),
            (["copy", "--bitmap=b0", uri, server.path("missing.raw")], "is not there"),
            (["copy", "--bitmap=b0", uri, small], "of the source's size (1048576 bytes), not 524288"),
            (["copy", "--bitmap=b0", small, small], "needs an NBD source"),
            (["copy", "--bitmap=b0", "--verify", uri, small], "use nbd checksum"),
            (["copy", "--bitmap=b0", uri, "null:"], "not onto null:"),
        ]
        for (arguments, message) in cases {
            let result = try runNBD(arguments)
            #expect(result.status == 1, "\(arguments)")
            #expect(result.error.hasPrefix("nbd: ") && result.error.contains(message), "\(arguments): \(result.error)")
            #expect(result.error.split(separator: "\n").count == 1, "\(result.error)")
        }
        #expect(!FileManager.default.fileExists(atPath: server.path("missing.raw")))
    }
}
