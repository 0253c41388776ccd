import Foundation
import Logging
import NBD
import NBDServer
import NIOConcurrencyHelpers
import NIOCore
import ServiceLifecycle
import TestSupport
import Testing

/// How the server starts and stops: as a Service in a ServiceGroup (a graceful shutdown answers
/// the requests in flight), `nbd serve --port 0 --print-uri`, socket activation (LISTEN_FDS, as
/// systemd passes a socket) and `--exit-with-parent`.
@Suite("Server lifecycle", .serialized)
struct ServerLifecycleTests {
    /// Memory whose reads take `delay`: a request is in flight when the shutdown comes.
    struct SlowBackend: NBDServerBackend {
        let inner = MemoryBackend(size: 1 << 20)
        let delay: Duration
        /// Reads begun so far.
        let reads = NIOLockedValueBox(0)
        var size: UInt64 { inner.size }
        var isReadOnly: Bool { false }
        var flushCoversAllConnections: Bool { true }
        var zeroIsFast: Bool { true }
        func read(at offset: UInt64, length: Int) async throws -> ByteBuffer {
            reads.withLockedValue { $0 += 1 }
            // Slow on purpose: the read is in flight when the shutdown comes.
            try await Task.sleep(for: delay)
            return try await inner.read(at: offset, length: length)
        }
        func write(_ data: ByteBuffer, at offset: UInt64, fua: Bool) async throws { try await inner.write(data, at: offset, fua: fua) }
        func flush() async throws {}
        func trim(at offset: UInt64, length: UInt64) async throws {}
        func zero(at offset: UInt64, length: UInt64, noHole: Bool) async throws {
            try await inner.zero(at: offset, length: length, noHole: noHole)
        }
        func extents(at offset: UInt64, length: UInt64) async throws -> [BlockDescriptor] {
            try await inner.extents(at: offset, length: length)
        }
    }

    @Test func aGracefulShutdownOfTheGroupAnswersWhatIsInFlight() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let socket = folder.path("service.sock")
        let backend = SlowBackend(delay: .milliseconds(500))
        try await backend.write(ByteBuffer(repeating: 0x42, count: 4096), at: 0, fua: false)
        let server = try await NBDServer.start(exports: [NBDServerExport(backend: backend)], on: .unix(path: socket))
        let group = ServiceGroup(services: [server], logger: Logger(label: "test"))
        let running = Task { try await group.run() }
        let export = try await NBDExport.connect(to: NBDURI(socket: socket))
        let read = Task { try await export.read(at: 0, length: 4096) }
        try await waitUntil("the read to reach the backend") { backend.reads.withLockedValue { $0 } > 0 }
        await group.triggerGracefulShutdown()
        // The read in flight is answered with its data; then the group's run returns.
        #expect(try await read.value.readableBytesView.allSatisfy { $0 == 0x42 })
        try await running.value
        await #expect(throws: (any Error).self) { _ = try await NBDExport.connect(to: NBDURI(socket: socket)) }
        await export.close()
    }

    @Test func cancellingTheServiceStopsIt() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let socket = folder.path("cancel.sock")
        let server = try await NBDServer.start(exports: [NBDServerExport(backend: MemoryBackend(size: 1 << 20))], on: .unix(path: socket))
        let running = Task { try await server.run() }
        #expect(try await NBDExport.connect(to: NBDURI(socket: socket)).size == 1 << 20)
        running.cancel()
        try await running.value
        await #expect(throws: (any Error).self) { _ = try await NBDExport.connect(to: NBDURI(socket: socket)) }
    }

    @Test func portZeroPrintsTheURIAndSIGTERMStopsCleanly() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: nbdTool)
        process.arguments = ["serve", "--memory", "16M", "--name", "disk", "--port", "0", "--print-uri"]
        let output = Pipe()
        process.standardOutput = output
        process.standardError = FileHandle.nullDevice
        try process.run()
        let line = String(decoding: output.fileHandleForReading.availableData, as: UTF8.self).trimmingCharacters(
            in: .whitespacesAndNewlines
        )
        let uri = try NBDURI(line)
        guard case .tcp(_, let port?) = uri.transport else {
            Issue.record("not a TCP URI with a port: \(line)")
            kill(process.processIdentifier, SIGKILL)
            return
        }
        #expect(port != 0 && port != 10809 && uri.exportName == "disk")
        #expect(try folder.run("nbdinfo", ["--size", line]) == Data("16777216\n".utf8))
        kill(process.processIdentifier, SIGTERM)
        try await process.exited()
        #expect(process.terminationStatus == 0)
    }

    @Test func aSocketFromSystemdIsServed() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let socket = folder.path("activated.sock")
        // What systemd does: a listening socket as descriptor 3, LISTEN_PID naming the process.
        let script = """
            import os, socket, sys
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(sys.argv[1]); s.listen(16)
            if s.fileno() != 3: os.dup2(s.fileno(), 3)
            os.set_inheritable(3, True)
            os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="nbd")
            os.execv(sys.argv[2], sys.argv[2:])
            """
        let serve = [nbdTool, "serve", "--memory", "8M", "--print-uri"]
        try await folder.start("/usr/bin/python3", ["-c", script, socket] + serve, waitFor: socket)
        #expect(try folder.run("nbdinfo", ["--size", NBDURI(socket: socket).description]) == Data("8388608\n".utf8))
        // --print-uri names the socket systemd passed, not a TCP port nobody listens on (the log
        // holds the server's standard output and its log lines).
        try await waitUntil(file: folder.path("python3.log"), holds: "nbd+unix://")
        let output = try String(contentsOfFile: folder.path("python3.log"), encoding: .utf8).split(separator: "\n")
        let printed = output.filter { $0.hasPrefix("nbd") }
        #expect(printed == [Substring(NBDURI(socket: socket).description)], "\(output)")
        let refused = try runProcess(
            "/usr/bin/python3",
            ["-c", script, folder.path("other.sock"), nbdTool, "serve", "--memory", "8M", "--port", "7"]
        )
        #expect(refused.status == 1 && refused.error.contains("--socket and --port do not apply"), "\(refused.error)")
    }

    /// Bound to every address, `nbd serve` warns that it serves in clear beyond this host, and
    /// prints a URI a client here can dial (loopback of the family); on loopback it is quiet.
    /// Each runs in a network namespace of its own, with only loopback: nothing is opened to a
    /// network. The server's URI line is polled for (30 s); the client is `nbdinfo`.
    @Test(arguments: [("0.0.0.0", "nbd://127.0.0.1:"), ("::", "nbd://[::1]:"), ("127.0.0.1", "nbd://127.0.0.1:")])
    func aWildcardBindWarnsAndPrintsALoopbackURI(bind: String, printed: String) throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let script = """
            ip link set lo up || exit 3
            "$1" serve --memory 1M --bind "$2" --port 0 --print-uri >uri 2>log &
            server=$!
            trap 'kill -KILL $server 2>/dev/null' EXIT
            tries=0
            until [ -s uri ]; do tries=$((tries + 1)); [ $tries -le 300 ] || exit 4; sleep 0.1; done
            nbdinfo --size "$(head -1 uri)" || exit 5
            kill -TERM $server; wait $server
            """
        for tool in ["ip", "nbdinfo", "unshare"] { _ = try ServerProcess.executable(tool) }
        let result = try runProcess(
            try ServerProcess.executable("unshare"),
            ["--net", "/bin/sh", "-c", script, "sh", nbdTool, bind],
            in: URL(fileURLWithPath: folder.path("."))
        )
        let uri = try String(contentsOfFile: folder.path("uri"), encoding: .utf8)
        let log = try String(contentsOfFile: folder.path("log"), encoding: .utf8)
        #expect(result.status == 0 && String(decoding: result.output, as: UTF8.self) == "1048576\n", "\(result.status) \(log)")
        #expect(uri.hasPrefix(printed), "\(uri)")
        let warned = log.contains("warning") && log.contains("serving \(bind) port ") && log.contains("in clear")
        #expect(warned == (bind != "127.0.0.1"), "\(log)")
        #expect(log.contains("--tls=require") == (bind != "127.0.0.1"), "\(log)")
    }

    @Test func exitWithParentEndsTheServerWithItsParent() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let socket = folder.path("child.sock")
        // A parent that starts the server, says its pid, and exits a second later (a pause on
        // purpose: the server is up and serving before its parent goes).
        let script = """
            import os, sys, time
            pid = os.fork()
            if pid == 0: os.execv(sys.argv[1], sys.argv[1:])
            print(pid, flush=True); time.sleep(1); os._exit(0)
            """
        let parent = try runProcess(
            "/usr/bin/python3",
            ["-c", script, nbdTool, "serve", "--memory", "8M", "--socket", socket, "--exit-with-parent"]
        )
        let pid = try #require(Int32(String(decoding: parent.output, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)))
        try await waitUntil("the server (\(pid)) to end with its parent", seen: "it still runs") { kill(pid, 0) != 0 }
    }
}
