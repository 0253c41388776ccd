import Foundation
import NBD
import NIOCore
import TestSupport
import Testing

/// Servers started for the connection, as libnbd starts them: on standard input and output
/// (`nbd_connect_command`), by systemd socket activation (`[ CMD ]` in its tools), and a socket
/// opened by the caller.
@Suite("Servers started for the connection", .serialized)
struct ServerCommandTests {
    /// Whether a process whose command line holds `marker` runs.
    func running(_ marker: String) throws -> Bool {
        try runProcess("/usr/bin/pgrep", ["-f", marker]).status == 0
    }

    /// Waits until no process whose command line holds `marker` runs.
    func waitUntilGone(_ marker: String, _ what: String) async throws {
        try await waitUntil("\(what) to end (no process matching \"\(marker)\")", seen: "it still runs") { try !running(marker) }
    }

    @Test func nbdkitOnStandardInputAndOutput() async throws {
        _ = try ServerProcess.executable("nbdkit")
        // An odd size marks this server's command line.
        let size = "\(3 << 20 + 4096)"
        let connection = try await NBDConnection.connect(command: ["nbdkit", "-s", "memory", size])
        let export = try await connection.go()
        #expect(export.size == UInt64(size))
        try await export.write(pattern(65536, seed: 7), at: 4096)
        #expect(try await export.read(at: 4096, length: 65536) == pattern(65536, seed: 7))
        #expect(try running("memory \(size)"))
        await export.disconnect()
        try await waitUntilGone("memory \(size)", "nbdkit, once its connection closed,")
    }

    @Test func aCommandThatCannotStartSaysWhy() async throws {
        do {
            _ = try await NBDConnection.connect(command: ["no-such-nbd-server", "-s"])
            Issue.record("a missing command connected")
        } catch let error as NBDError {
            #expect(error.code == .connectFailed && error.message == "cannot start no-such-nbd-server: No such file or directory")
        }
        do {
            _ = try NBDServerCommand(["no-such-nbd-server"])
            Issue.record("a missing command started")
        } catch let error as NBDError {
            #expect(error.code == .connectFailed && error.message == "cannot start no-such-nbd-server: not found")
        }
    }

    /// qemu-nbd and nbdkit by socket activation, each behind an NBDClient of several
    /// connections where the server allows it; stopping removes the server and its socket.
    @Test(arguments: ["qemu-nbd", "nbdkit"])
    func socketActivatedServersServeAClient(tool: String) async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        _ = try ServerProcess.executable(tool)
        let image = folder.path("disk.raw")
        _ = FileManager.default.createFile(atPath: image, contents: nil)
        try FileHandle(forWritingTo: URL(fileURLWithPath: image)).truncate(atOffset: 8 << 20)
        // qemu-nbd -t: without it, qemu-nbd ends when its last client leaves, on its own schedule,
        // and whether it still runs after the client closed would be a race.
        let command = tool == "qemu-nbd" ? ["qemu-nbd", "-t", "-f", "raw", image] : ["nbdkit", "file", image]
        let server = try NBDServerCommand(command)
        #expect(server.uri.isUnix)
        var configuration = NBDClient.Configuration()
        configuration.connections = 2
        try await NBDClient.withClient(server.uri, configuration: configuration) { client in
            #expect(try await client.size == 8 << 20)
            try await client.write(pattern(1 << 20, seed: 3), at: 1 << 20)
            try await client.flush()
            #expect(try await client.read(at: 1 << 20, length: 1 << 20) == pattern(1 << 20, seed: 3))
        }
        #expect(server.exitStatus == nil)
        await server.stop()
        #expect(!FileManager.default.fileExists(atPath: server.uri.description))
        if case .unix(let path) = server.uri.transport { #expect(!FileManager.default.fileExists(atPath: path)) }
        try await waitUntilGone(image, "\(tool), once stopped,")
        let written = try Data(contentsOf: URL(fileURLWithPath: image))
        #expect(written[(1 << 20)..<(2 << 20)] == Data(pattern(1 << 20, seed: 3).readableBytesView))
    }

    /// libnbd's spelling on the command line, on the commands that take an export.
    @Test func bracketsStartAServerForTheCommand() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        _ = try ServerProcess.executable("qemu-img")
        let qcow2 = folder.path("disk.qcow2")
        _ = try folder.run("qemu-img", ["create", "-f", "qcow2", qcow2, "4M"])
        _ = try folder.run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x5a 1M 64k", qcow2])
        let info = try runNBD(["info", "--size", "[", "nbdkit", "memory", "1G", "]"])
        #expect(info.status == 0 && info.output == "1073741824\n", "\(info.error)")
        let copy = try runNBD(["copy", "[", "qemu-nbd", "-f", "qcow2", qcow2, "]", folder.path("out.raw")])
        #expect(copy.status == 0, "\(copy.error)")
        let out = try Data(contentsOf: URL(fileURLWithPath: folder.path("out.raw")))
        #expect(out.count == 4 << 20)
        #expect(out[(1 << 20)..<((1 << 20) + 65536)].allSatisfy { $0 == 0x5a })
        #expect(out[0..<(1 << 20)].allSatisfy { $0 == 0 })
        try await waitUntilGone(qcow2, "qemu-nbd, once nbd copy ended,")
        let sums = try runNBD(["checksum", "[", "nbdkit", "pattern", "4M", "]", "[", "nbdkit", "pattern", "4M", "]"])
        let lines = sums.output.split(separator: "\n").map { $0.split(separator: " ").first ?? "" }
        #expect(sums.status == 0 && lines.count == 2 && lines[0] == lines[1], "\(sums.error)")
        for (arguments, message) in [
            (["info", "[", "no-such-nbd-server", "]"], "nbd: cannot start no-such-nbd-server: not found\n"),
            (["info", "[", "nbdkit", "memory", "1G"], "nbd: a server command opened with \"[\" needs a closing \"]\"\n"),
            (["info", "[", "nbdkit", "no-such-plugin", "]"], "nbd: the server command nbdkit no-such-plugin exited with status 1\n"),
        ] {
            let result = try runNBD(arguments)
            #expect(result.status == 1 && result.error.hasSuffix(message), "\(arguments): \(result.error)")
        }
    }
}
