import Foundation
import NBD
import NBDServer
import NIOCore
import TestSupport
import Testing

/// `nbd zero` and `nbd trim` (libnbd 1.24's nbdzero and nbddiscard), and the question they ask.
@Suite("nbd zero and nbd trim", .serialized)
struct EraseCommandTests {
    /// An export of `size` bytes of the test pattern; returns its URI.
    func filled(_ server: ServerProcess, _ plugin: [String], size: Int) async throws -> NBDURI {
        let uri = try await server.nbdkit(plugin)
        try await NBDExport.withExport(uri) { try await $0.write(pattern(size, seed: 9), at: 0) }
        return uri
    }

    /// The export's bytes.
    func contents(_ uri: NBDURI) async throws -> [UInt8] {
        try await NBDExport.withExport(uri) { export in
            Array(try await export.read(at: 0, length: export.size).readableBytesView)
        }
    }

    func expected(_ size: Int, erasing range: Range<Int>) -> [UInt8] {
        var bytes = Array(pattern(size, seed: 9).readableBytesView)
        bytes.replaceSubrange(range, with: repeatElement(0, count: range.count))
        return bytes
    }

    @Test func zeroARangeThenTheWholeExport() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await filled(server, ["memory", "8M"], size: 8 << 20)
        // A range is erased without -y, even with no terminal to ask on.
        let result = try runNBD(["zero", "--offset", "1M", "--length", "512K", uri.description])
        #expect(result.status == 0, "\(result.error)")
        #expect(try await contents(uri) == expected(8 << 20, erasing: (1 << 20)..<(1536 << 10)))
        #expect(try runNBD(["zero", "--yes", "--fast-zero", uri.description]).status == 0)
        #expect(try await contents(uri) == [UInt8](repeating: 0, count: 8 << 20))
    }

    /// Trim to the end, on qemu-nbd (a raw file: the range becomes a hole) and on the built-in
    /// server, with the bytes before it untouched.
    @Test func trimFromAnOffsetOnQemuAndTheBuiltInServer() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let image = server.path("disk.raw")
        try Data(pattern(4 << 20, seed: 9).readableBytesView).write(to: URL(fileURLWithPath: image))
        let socket = server.path("qemu.sock")
        try await server.start("qemu-nbd", ["-k", socket, "-t", "-f", "raw", "--discard=unmap", image], waitFor: socket)
        let ours = try await NBDServer.start(
            exports: [NBDServerExport(backend: MemoryBackend(size: 4 << 20))],
            on: .unix(path: server.path("ours.sock"))
        )
        defer { Task { await ours.shutdown() } }
        let builtIn = NBDURI(socket: server.path("ours.sock"))
        try await NBDExport.withExport(builtIn) { try await $0.write(pattern(4 << 20, seed: 9), at: 0) }
        for uri in [NBDURI(socket: socket), builtIn] {
            let result = try runNBD(["trim", "-o", "3M", uri.description])
            #expect(result.status == 0, "\(result.error)")
            #expect(try await contents(uri) == expected(4 << 20, erasing: (3 << 20)..<(4 << 20)), "\(uri)")
        }
    }

    /// The whole export, not on a terminal and no -y: refused, and nothing erased; a range that
    /// covers the whole export counts as the whole export.
    @Test func withoutATerminalItRefusesUnlessYes() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await filled(server, ["memory", "1M"], size: 1 << 20)
        for arguments in [["zero"], ["trim"], ["zero", "-o", "0", "-l", "1M"], ["trim", "--length", "1M"]] {
            let result = try runNBD(arguments + [uri.description])
            #expect(result.status == 1, "\(arguments)")
            #expect(result.error == "nbd: refusing to erase without -y: standard input is not a terminal to ask on\n")
        }
        #expect(try await contents(uri) == Array(pattern(1 << 20, seed: 9).readableBytesView))
    }

    /// On a terminal (script(1) makes one) it asks: no keeps the data, yes erases it.
    @Test func onATerminalItAsks() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await filled(server, ["memory", "1M"], size: 1 << 20)
        let command = "'\(nbdTool)' zero '\(uri)'"
        let no = try runProcess("/bin/sh", ["-c", "echo n | script -qec \"\(command)\" /dev/null"])
        let said = String(decoding: no.output, as: UTF8.self)
        #expect(no.status == 1)
        #expect(said.contains("PERMANENTLY ERASE everything on \(uri) (1048576 bytes)") && said.contains("not erased"), "\(said)")
        #expect(try await contents(uri) == Array(pattern(1 << 20, seed: 9).readableBytesView))
        let yes = try runProcess("/bin/sh", ["-c", "echo y | script -qec \"\(command)\" /dev/null"])
        #expect(yes.status == 0, "\(String(decoding: yes.output, as: UTF8.self))")
        #expect(try await contents(uri) == [UInt8](repeating: 0, count: 1 << 20))
    }

    /// A server without fast zero, a read-only one, ranges past the end: one line, exit 1.
    @Test func refusalsAreOneLine() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let slowZero = try await server.nbdkit(["--filter=nozero", "memory", "1M", "zeromode=plugin", "fastzeromode=none"]).description
        let readOnly = try await server.nbdkit(["-r", "memory", "1M"]).description
        let cases: [([String], String)] = [
            (["zero", "-y", "--fast-zero", slowZero], "NBD_FLAG_SEND_FAST_ZERO"),
            (["zero", "-y", readOnly], "read-only"),
            (["trim", "-y", "--offset", "2M", slowZero], "past the end"),
            (["zero", "-y", "--length", "2M", slowZero], "runs past the end"),
            (["zero", "-y", "--length", "lots", slowZero], "not a size"),
            (["trim", "-y"], "uri"),
        ]
        for (arguments, message) in cases {
            let result = try runNBD(arguments)
            #expect(result.status == 1, "\(arguments)")
            #expect(result.error.hasPrefix("nbd: ") && result.error.contains(message), "\(arguments): \(result.error)")
            #expect(result.error.split(separator: "\n").count == 1, "\(result.error)")
        }
    }
}
