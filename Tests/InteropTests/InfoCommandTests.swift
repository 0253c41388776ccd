import Foundation
import NBD
import NBDServer
import Testing

/// `nbd info` beside `nbdinfo` 1.22 (from the trixie chroot, which `nbd info` follows) on the
/// same exports: identical output, but for nbdinfo's `content` line (it runs file(1) on the
/// first sector, which `nbd info` does not).
@Suite("nbd info beside nbdinfo", .serialized)
struct InfoCommandTests {
    func nbdinfo(_ server: ServerProcess, _ arguments: [String]) throws -> String {
        String(decoding: try server.run("trixie:nbdinfo", arguments), as: UTF8.self)
            .split(separator: "\n", omittingEmptySubsequences: false)
            .filter { !$0.contains("content") }.joined(separator: "\n")
    }

    /// The same output, but for our `can_resize` line, which nbdinfo does not know.
    func expectSame(_ server: ServerProcess, _ arguments: [String], sourceLocation: SourceLocation = #_sourceLocation) throws {
        let ours = try runNBD(["info"] + arguments)
        #expect(ours.status == 0, "\(ours.error)", sourceLocation: sourceLocation)
        #expect(asNbdinfoPrintsIt(ours.output) == (try nbdinfo(server, arguments)), sourceLocation: sourceLocation)
    }

    @Test func nbdkitMemoryAndReadOnly() async throws {
        for extra in [[], ["-r"]] {
            let server = try ServerProcess()
            defer { server.stop() }
            let uri = try await server.nbdkit(extra + ["memory", "64M"]).description
            try expectSame(server, [uri])
            try expectSame(server, ["--json", uri])
            try expectSame(server, ["--size", uri])
        }
    }

    @Test func mapOfASparseExport() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(["sparse-random", "64M", "seed=7", "percent=20"]).description
        for arguments in [["--map"], ["--map", "--json"], ["--map", "--totals"], ["--map", "--totals", "--json"]] {
            try expectSame(server, arguments + [uri])
        }
    }

    @Test func mapOverFourGiB() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(["sparse-random", "6G", "seed=3", "percent=5", "runlength=1048576"]).description
        try expectSame(server, ["--map", uri])
    }

    @Test func qemuQcow2WithADirtyBitmap() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        _ = try server.run("qemu-img", ["create", "-f", "qcow2", "disk.qcow2", "64M"])
        _ = try server.run("qemu-img", ["bitmap", "--add", "disk.qcow2", "b0"])
        _ = try server.run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x55 2M 256k", "disk.qcow2"])
        let socket = server.path("qemu.sock")
        try await server.start(
            "qemu-nbd",
            ["-f", "qcow2", "-k", socket, "-x", "disk", "-t", "-e", "4", "-B", "b0", server.path("disk.qcow2")],
            waitFor: socket
        )
        let uri = NBDURI(socket: socket, exportName: "disk").description
        try expectSame(server, [uri])
        try expectSame(server, ["--json", uri])
        try expectSame(server, ["--map", uri])
        try expectSame(server, ["--map=qemu:dirty-bitmap:b0", uri])
        try expectSame(server, ["--map=qemu:dirty-bitmap:b0", "--json", uri])
    }

    @Test func nbdServerList() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let socket = server.path("nbd-server.sock")
        let image = server.path("disk.raw")
        _ = FileManager.default.createFile(atPath: image, contents: Data(count: 1 << 20))
        try """
        [generic]
            unixsock = \(socket)
            allowlist = true
        [one]
            exportname = \(image)
        [two]
            exportname = \(image)
            readonly = true
        """.write(toFile: server.path("config"), atomically: true, encoding: .utf8)
        try await server.start("nbd-server", ["-C", server.path("config"), "-d"], waitFor: socket, probe: false)
        let uri = NBDURI(socket: socket, exportName: "one").description
        try expectSame(server, ["--list", uri])
        try expectSame(server, ["--list", "--json", uri])
    }

    @Test func canAndIsAnswerWithTheExitStatus() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(["-r", "memory", "16M"]).description
        #expect(try runNBD(["info", "--is", "read-only", uri]).status == 0)
        #expect(try runNBD(["info", "--isnt", "read-only", uri]).status == 2)
        #expect(try runNBD(["info", "--can", "flush", uri]).status == 0)
        #expect(try runNBD(["info", "--can", "trim", uri]).status == 2)
        #expect(try runNBD(["info", "--cannot", "trim", uri]).status == 0)
        #expect(try runNBD(["info", "--can", "connect", uri]).status == 0)
    }

    @Test(arguments: [
        ["info", "http://example.com/"],  // unknown scheme
        ["info", "nbd+unix:///disk"],  // missing socket parameter
        ["info", "--frobnicate", "nbd://localhost/"],  // unknown flag
        ["info", "--can", "teleport", "nbd://localhost/"],  // unknown feature
        ["info", "--totals", "nbd://localhost/"],  // --totals without --map
        ["info", "nbd+unix:///?socket=/nonexistent/nbd.sock"],  // nothing listening
        ["info", "--tls-psk-file", "/nonexistent.psk", "nbd+unix:///?socket=/nonexistent/s"],  // no PSK file
    ])
    func badCommandLinesGiveOneLineAndExitOne(arguments: [String]) throws {
        let result = try runNBD(arguments)
        #expect(result.status == 1)
        #expect(result.error.hasPrefix("nbd: "))
        #expect(result.error.split(separator: "\n").count == 1, "\(result.error)")
        #expect(result.output.isEmpty)
    }

    /// A wrong export name says which (the default export is called that, not "") and what the
    /// server offers, from NBD_OPT_LIST on the same connection: on our server, qemu-nbd and nbdkit.
    @Test func aWrongExportNameListsWhatThereIs() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let ours = server.path("ours.sock")
        let built = try await NBDServer.start(
            exports: [NBDServerExport(name: "disk", backend: MemoryBackend(size: 1 << 20))],
            on: .unix(path: ours)
        )
        defer { Task { await built.shutdown() } }
        let image = server.path("disk.raw")
        try Data(count: 1 << 20).write(to: URL(fileURLWithPath: image))
        let qemu = server.path("qemu.sock")
        try await server.start("qemu-nbd", ["-k", qemu, "-t", "-f", "raw", "-x", "disk", image], waitFor: qemu)
        // What the server said about it follows, as with any refusal.
        for socket in [ours, qemu] {
            let missing = try runNBD(["info", "nbd+unix:///?socket=\(socket)"])
            #expect(missing.status == 1)
            #expect(missing.error.hasPrefix("nbd: the server offers \"disk\", but no default export, the empty name (NBD_REP_ERR_UNKNOWN)"))
            let named = try runNBD(["dump", "nbd+unix:///nope?socket=\(socket)"])
            #expect(named.error.hasPrefix("nbd: the server offers \"disk\", but no export named \"nope\" (NBD_REP_ERR_UNKNOWN)"))
        }
        let ourMissing = try runNBD(["info", "nbd+unix:///?socket=\(ours)"])
        #expect(ourMissing.error.hasSuffix("(NBD_REP_ERR_UNKNOWN): server says \"there is no default export\"\n"), "\(ourMissing.error)")
        // nbdkit's exportname filter with strict names: it lists two, and knows no others.
        let nbdkit = try await server.nbdkit([
            "--filter=exportname", "memory", "1M", "exportname=a", "exportname=b", "exportname-strict=true", "exportname-list=explicit",
        ])
        let refused = try runNBD(["info", "nbd+unix:///c?socket=\(try nbdkit.socketPath)"])
        #expect(refused.error.hasPrefix("nbd: the server offers \"a\", \"b\", but no export named \"c\" (NBD_REP_ERR_UNKNOWN)"))
    }
}
