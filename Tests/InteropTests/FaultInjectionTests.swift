import Foundation
import NBD
@_spi(NBDMachines) import NBDCore
import NBDServer
import NIOCore
import TestSupport
import Testing

/// Faults injected into real peers: nbdkit's error and delay filters, servers killed part way,
/// and `nbd serve` under clients that misbehave. Errors are reported, never success; data is
/// exact; the server stays within its bounds.
@Suite("Fault injection", .serialized)
struct FaultInjectionTests {
    struct Fault: CustomTestStringConvertible, Sendable {
        var name: String
        /// nbdkit's arguments for the faulty server, and `nbd copy`'s with SERVER for its URI.
        var server: [String]
        var copy: [String]
        var expected: String
        var testDescription: String { name }
    }

    static let faults: [Fault] = [
        Fault(
            name: "read",
            server: ["--filter=error", "pattern", "64M", "error-pread=EIO", "error-pread-rate=3%"],
            copy: ["--request-size", "64K", "SERVER", "null:"],
            expected: "EIO"
        ),
        Fault(
            name: "write",
            server: ["--filter=error", "memory", "64M", "error-pwrite=ENOSPC", "error-pwrite-rate=3%"],
            copy: ["--request-size", "64K", "pattern:64M", "SERVER"],
            expected: "ENOSPC"
        ),
        Fault(
            name: "zero",
            server: ["--filter=error", "memory", "64M", "error-zero=EIO", "error-zero-rate=100%"],
            copy: ["zero:64M", "SERVER"],
            expected: "EIO"
        ),
        Fault(
            name: "block status",
            server: ["--filter=error", "memory", "64M", "error-extents=EIO", "error-extents-rate=100%"],
            copy: ["SERVER", "null:"],
            expected: "EIO"
        ),
    ]

    @Test(arguments: faults)
    func copyFailsNamingTheServersError(fault: Fault) async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(fault.server).description
        let result = try runNBD(["copy"] + fault.copy.map { $0 == "SERVER" ? uri : $0 })
        #expect(result.status == 1, "\(result.error)")
        #expect(result.error.hasPrefix("nbd: ") && result.error.contains(fault.expected), "\(result.error)")
    }

    @Test func theLibraryReportsTheServersErrnoForEachCommand() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        // nbdkit 1.32's error filter has no flush: the five commands it can fail.
        let arguments = ["pread", "pwrite", "trim", "zero", "extents"].flatMap { ["error-\($0)=EIO", "error-\($0)-rate=100%"] }
        let uri = try await server.nbdkit(["--filter=error", "memory", "1M"] + arguments)
        let export = try await NBDExport.connect(to: uri)
        let calls: [(String, () async throws -> Void)] = [
            ("read", { _ = try await export.read(at: 0, length: 512) }),
            ("write", { try await export.write(ByteBuffer(repeating: 1, count: 512), at: 0) }),
            ("trim", { try await export.trim(at: 0, length: 512) }),
            ("zero", { try await export.writeZeroes(at: 0, length: 512) }),
            ("block status", { _ = try await export.blockStatus(at: 0, length: 512) }),
        ]
        for (name, call) in calls {
            do {
                try await call()
                Issue.record("\(name) succeeded against a server failing every \(name)")
            } catch let error as NBDError {
                #expect(error.code == .serverError && error.serverErrno == .EIO && error.connectionUsable, "\(name): \(error)")
            }
        }
        await export.disconnect()
    }

    @Test func delayedRepliesInAnyOrderStillGiveExactData() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(["--filter=delay", "memory", "16M", "delay-read=3ms", "delay-write=2ms"]).description
        var original = Data(pattern(16 << 20, seed: 77).readableBytesView)
        original.replaceSubrange((4 << 20)..<(6 << 20), with: Data(count: 2 << 20))
        try original.write(to: URL(fileURLWithPath: server.path("in.raw")))
        let copyIn = try runNBD(["copy", "--request-size", "64K", server.path("in.raw"), uri])
        #expect(copyIn.status == 0, "\(copyIn.error)")
        let copyOut = try runNBD(["copy", "--request-size", "64K", uri, server.path("out.raw")])
        #expect(copyOut.status == 0, "\(copyOut.error)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: server.path("out.raw"))) == original)
    }

    /// nbdkit 1.32's delay filter has fixed delays only; an sh plugin of nbdkit makes each read
    /// and write wait 0 to 9 ms at random (sleeps on purpose), on many threads, so replies
    /// overtake each other.
    @Test func randomlyDelayedRepliesGiveExactData() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let script = """
            #!/usr/bin/env bash
            case "$1" in
                load) truncate -s 16M "$tmpdir/disk" ;;
                get_size) echo 16777216 ;;
                thread_model) echo parallel ;;
                can_write | can_flush | can_multi_conn) exit 0 ;;
                pread) sleep "0.00$((RANDOM % 10))"; dd if="$tmpdir/disk" skip="$4" count="$3" iflag=skip_bytes,count_bytes status=none ;;
                pwrite) sleep "0.00$((RANDOM % 10))"; dd of="$tmpdir/disk" seek="$4" conv=notrunc oflag=seek_bytes status=none ;;
                flush) sync ;;
                *) exit 2 ;;
            esac
            """
        try script.write(toFile: server.path("random.sh"), atomically: true, encoding: .utf8)
        chmod(server.path("random.sh"), 0o755)
        let uri = try await server.nbdkit(["sh", server.path("random.sh")]).description
        let original = Data(pattern(16 << 20, seed: 91).readableBytesView)
        try original.write(to: URL(fileURLWithPath: server.path("in.raw")))
        let copyIn = try runNBD(["copy", "--request-size", "64K", "--flush", server.path("in.raw"), uri])
        #expect(copyIn.status == 0, "\(copyIn.error)")
        let copyOut = try runNBD(["copy", "--request-size", "64K", uri, server.path("out.raw")])
        #expect(copyOut.status == 0, "\(copyOut.error)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: server.path("out.raw"))) == original)
    }

    @Test(arguments: ["source", "destination"])
    func aServerKilledMidCopyFailsTheCopyAtOnce(side: String) async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let (nbdkit, uri) = try await server.slowNBDKit(side == "source" ? ["pattern", "4G"] : ["memory", "4G"])
        let process = Process()
        process.executableURL = URL(fileURLWithPath: nbdTool)
        process.arguments = ["copy"] + (side == "source" ? [uri, "null:"] : ["pattern:4G", uri])
        let errors = Pipe()
        process.standardError = errors
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        // Killed once the copy is under way: 4 MiB through the copy's sockets.
        try await waitUntil("nbd copy to move 4 MiB", seen: "\(bytesMoved(by: process.processIdentifier))") {
            guard process.isRunning else { throw InteropError("nbd copy ended before the server was killed") }
            let moved = bytesMoved(by: process.processIdentifier)
            return (side == "source" ? moved.read : moved.written) >= 4 << 20
        }
        kill(nbdkit.processIdentifier, SIGKILL)
        let killedAt = ContinuousClock.now
        try await process.exited()
        let text = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(process.terminationStatus == 1, "\(text)")
        // At once: not after the tool's 60 s request timeout, which a missed loss would wait for.
        #expect(ContinuousClock.now - killedAt < within(.seconds(10)))
        #expect(text.contains("the server closed the connection") || text.contains("reset the connection"), "\(text)")
    }
}

extension FaultInjectionTests {
    /// The resident memory of a process, from /proc.
    func residentMiB(_ pid: Int32) throws -> Int {
        let status = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
        let line = try #require(status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") })
        return (Int(line.split(separator: " ").dropFirst().first ?? "0") ?? 0) / 1024
    }

    @Test func nbdServeStaysWithinItsBoundsWhateverClientsSend() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let socket = folder.path("serve.sock")
        let serve = try await folder.start(
            nbdTool,
            ["serve", "--memory", "256M", "--connection-buffer", "8M", "--socket", socket],
            waitFor: socket
        )
        let baseline = try residentMiB(serve.processIdentifier)
        // A client that never reads: 500 READs of 1 MiB (500 MiB of replies).
        let rude = try await RawClient(socket: socket)
        try await rude.enterTransmission()
        try await rude.stopReading()
        try await rude.send { buffer in
            for index in 0..<500 {
                RequestHeader(type: .read, cookie: NBDCookie(UInt64(index)), offset: UInt64(index % 256) << 20, length: 1 << 20).encode(
                    into: &buffer
                )
            }
        }
        // Garbage, an oversized option, and a WRITE cut off part way, on three more connections.
        let garbage = try await RawClient(socket: socket)
        try await garbage.send { $0.writeBytes((0..<65536).map { UInt8(truncatingIfNeeded: $0 &* 7919) }) }
        let oversized = try await RawClient(socket: socket)
        _ = try await oversized.read(18)
        try await oversized.send {
            $0.writeInteger(UInt32(3))
            $0.writeBytes(Array("IHAVEOPT".utf8))
            $0.writeMultipleIntegers(UInt32(3), UInt32(1 << 30))
        }
        let cut = try await RawClient(socket: socket)
        try await cut.enterTransmission()
        try await cut.send {
            RequestHeader(type: .write, cookie: 1, offset: 128 << 20, length: 1 << 20).encode(into: &$0)
            $0.writeRepeatingByte(0xEE, count: 1000)
        }
        await cut.close()
        #expect(try await garbage.isClosedByServer())
        #expect(try await oversized.isClosedByServer())
        // A pause on purpose, for the rude client's replies to pile up if the bound failed.
        try await Task.sleep(for: .seconds(1))
        let held = try residentMiB(serve.processIdentifier)
        // The bound (8 MiB) plus one payload (32 MiB) per connection, not 500 MiB.
        #expect(held - baseline < 80, "serve grew from \(baseline) MiB to \(held) MiB")
        // Everyone else is served, exactly; the cut-off WRITE was not applied.
        let export = try await NBDExport.connect(to: NBDURI(socket: socket))
        #expect(try await export.read(at: 128 << 20, length: 1000) == ByteBuffer(repeating: 0, count: 1000))
        let data = pattern(4 << 20, seed: 5)
        try await export.write(data, at: 16 << 20)
        #expect(try await export.read(at: 16 << 20, length: 4 << 20) == data)
        await export.disconnect()
        await rude.close()
        var after = 0
        try await waitUntil("serve to hold less than 80 MiB over its start after the clients left", seen: "\(after) MiB over") {
            after = try residentMiB(serve.processIdentifier) - baseline
            return after < 80
        }
        kill(serve.processIdentifier, SIGTERM)
    }

    /// Four WRITE_ZEROES of 1 GiB with NO_HOLE, 16 bytes on the wire each, from nbdsh: the server
    /// stores marks, not 4 GiB of zeroes (it grew by 4.1 GiB before), and nbdinfo's map shows
    /// the range allocated and zero.
    @Test func zeroesWithNoHoleCostTheServerNoMemory() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let socket = folder.path("zero.sock")
        let serve = try await folder.start(nbdTool, ["serve", "--memory", "64G", "--socket", socket], waitFor: socket)
        let baseline = try residentMiB(serve.processIdentifier)
        let uri = NBDURI(socket: socket).description
        let script = """
            for i in range(4):
                h.zero(1 << 30, i << 30, flags=nbd.CMD_FLAG_NO_HOLE)
            assert h.pread(65536, (1 << 30) + 4096) == bytes(65536)
            print("ok")
            """
        // nbdsh imports Debian's python3 module: Debian's python3 goes first on PATH.
        let answer = try folder.run("env", ["PATH=/usr/bin:/bin", try ServerProcess.executable("nbdsh"), "-u", uri, "-c", script])
        #expect(answer == Data("ok\n".utf8))
        let grown = try residentMiB(serve.processIdentifier) - baseline
        #expect(grown < 32, "serve grew by \(grown) MiB for 4 GiB of zeroes")
        let map = String(decoding: try folder.run("nbdinfo", ["--map", uri]), as: UTF8.self)
        let lines = map.split(separator: "\n").map { $0.split(separator: " ", omittingEmptySubsequences: true).map(String.init) }
        #expect(lines.first == ["0", "4294967296", "2", "zero"], "\(map)")
        #expect(lines.dropFirst().first?.suffix(2) == ["3", "hole,zero"], "\(map)")
        kill(serve.processIdentifier, SIGTERM)
    }

    /// nbdkit 1.32's error filter cannot fail a flush: an nbdkit sh plugin whose flush fails
    /// with EIO does, and so does the built-in server with a backend whose flush throws.
    @Test(arguments: ["nbdkit", "built-in"])
    func aFailedFlushFailsTheCopyNamingTheError(peer: String) async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        var server: NBDServer?
        let uri: String
        if peer == "nbdkit" {
            let script = """
                #!/usr/bin/env bash
                case "$1" in
                    get_size) echo 4194304 ;;
                    can_write | can_flush) exit 0 ;;
                    pread) head -c "$3" /dev/zero ;;
                    pwrite) cat > /dev/null ;;
                    flush) echo "EIO the disk is gone" >&2; exit 1 ;;
                    *) exit 2 ;;
                esac
                """
            try script.write(toFile: folder.path("flush.sh"), atomically: true, encoding: .utf8)
            chmod(folder.path("flush.sh"), 0o755)
            uri = try await folder.nbdkit(["sh", folder.path("flush.sh")]).description
        } else {
            let socket = folder.path("flush.sock")
            let backend = TestBackend(size: 4 << 20, flushError: NBDServerError(.EIO, "the disk is gone"))
            server = try await NBDServer.start(exports: [NBDServerExport(backend: backend)], on: .unix(path: socket))
            uri = NBDURI(socket: socket).description
        }
        let result = try runNBD(["copy", "--flush", "pattern:4M", uri])
        #expect(result.status == 1)
        #expect(result.error.contains("the server failed NBD_CMD_FLUSH (EIO"), "\(result.error)")
        // nbdkit sends the error value only; the built-in server its message too.
        #expect(peer == "nbdkit" || result.error.contains("the disk is gone"), "\(result.error)")
        await server?.shutdown()
    }
}
