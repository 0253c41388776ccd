import Foundation
import NBD
import NIOCore
import NIOPosix
import TestSupport
import Testing

// Serialized: the helpers block a thread while a tool runs, and the machine has two cores.
@Suite("Interop: nbdkit", .serialized)
struct NBDKitTests {
    @Test func memoryWalkthrough() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(["memory", "64M"])
        try await walkthrough(server, uri, listed: [""])
    }

    @Test func tcpOverIPv4AndIPv6() async throws {
        for host in ["127.0.0.1", "::1"] {
            let server = try ServerProcess()
            defer { server.stop() }
            let pidFile = server.path("nbdkit.pid")
            let (_, port) = try await server.startOnFreePort("nbdkit", waitFor: pidFile) { port in
                ["--foreground", "-i", host, "-p", "\(port)", "-P", pidFile, "memory", "16M"]
            }
            let uri = try NBDURI(host.contains(":") ? "nbd://[\(host)]:\(port)/" : "nbd://\(host):\(port)")
            let export = try await NBDExport.connect(to: uri)
            let data = pattern(65536, seed: 3)
            try await export.write(data, at: 0)
            #expect(try await export.read(at: 0, length: 65536) == data)
            // Over TCP in clear, the data of large replies is read straight into place, in
            // pieces as TCP delivers them; every way to read gives the same bytes.
            let large = pattern(4 << 20, seed: 4)
            try await export.write(large, at: 1 << 20)
            for size in [256 << 10, 1 << 20] {
                var viaInto = ByteBuffer()
                var viaRead = ByteBuffer()
                var viaSegments = ByteBuffer()
                for offset in stride(from: 0, to: 4 << 20, by: size) {
                    let at = UInt64((1 << 20) + offset)
                    try await export.read(into: &viaInto, at: at, length: UInt64(size))
                    viaRead.writeImmutableBuffer(try await export.read(at: at, length: UInt64(size)))
                    for segment in try await export.readSegments(at: at, length: UInt64(size)) { viaSegments.writeImmutableBuffer(segment) }
                }
                #expect(viaInto == large && viaRead == large && viaSegments == large, "\(size)-byte reads over \(host)")
            }
            await export.disconnect()
        }
    }

    @Test func holesReadAsZeroesAndMapLikeNbdinfo() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(["sparse-random", "32M", "seed=42", "percent=30", "runlength=65536"])
        let export = try await NBDExport.connect(to: uri)
        defer { Task { await export.disconnect() } }
        let ours = try await mapExport(export, context: "base:allocation")
        #expect(ours == (try nbdinfoMap(server, uri)))
        #expect(ours.contains { $0.type & 1 != 0 } && ours.contains { $0.type == 0 })
        // The whole export by content, beside nbdcopy's copy of it.
        let copy = server.path("copy.raw")
        _ = try server.run("nbdcopy", [uri.description, copy])
        let expected = try Data(contentsOf: URL(fileURLWithPath: copy))
        let actual = try await export.read(at: 0, length: export.size)
        #expect(Data(actual.readableBytesView) == expected)
        await export.disconnect()
    }

    @Test func serverErrorFailsOneCommandAndKeepsTheConnection() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(["--filter=error", "memory", "16M", "error-pread=EIO", "error-pread-rate=100%"])
        let export = try await NBDExport.connect(to: uri)
        do {
            _ = try await export.read(at: 8192, length: 4096)
            Issue.record("read should fail")
        } catch let error as NBDError {
            #expect(error.code == .serverError)
            // The command and where: a log line that says which part of the disk is bad.
            #expect(error.message == "the server failed NBD_CMD_READ of 4096 bytes at offset 8192", "\(error)")
            #expect(error.serverErrno == .EIO)
            #expect(error.connectionUsable)
        }
        try await export.write(pattern(4096, seed: 1), at: 0)
        await export.disconnect()
    }

    @Test func blockSizeConstraintsAreHonoured() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit([
            "--filter=blocksize-policy", "memory", "16M", "blocksize-minimum=4096",
            "blocksize-preferred=65536", "blocksize-maximum=1048576", "blocksize-error-policy=error",
        ])
        let export = try await NBDExport.connect(to: uri)
        #expect(export.info.advertisedBlockSizes == BlockSizeConstraints(minimum: 4096, preferred: 65536, maximum: 1 << 20))
        // Unaligned: refused locally, nothing sent.
        await #expect { _ = try await export.read(at: 512, length: 4096) } throws: { ($0 as? NBDError)?.code == .invalidArgument }
        // Larger than the maximum payload: split into 1 MiB requests transparently.
        let data = pattern(4 << 20, seed: 9)
        try await export.write(data, at: 0)
        #expect(try await export.read(at: 0, length: 4 << 20) == data)
        await export.disconnect()
    }

    @Test func readOnlyExportRefusesWritesLocally() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(["-r", "pattern", "16M"])
        let export = try await NBDExport.connect(to: uri)
        #expect(export.info.isReadOnly)
        await #expect { try await export.write(pattern(512, seed: 1), at: 0) } throws: { ($0 as? NBDError)?.code == .notAdvertised }
        await #expect { try await export.trim(at: 0, length: 512) } throws: { ($0 as? NBDError)?.code == .notAdvertised }
        // The pattern plugin: each 8-byte word holds its own offset, big-endian.
        var data = try await export.read(at: 8 << 20, length: 64)
        #expect(data.readInteger(as: UInt64.self) == 8 << 20)
        await export.disconnect()
    }

    @Test func abstractUnixSocket() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(["memory", "16M"])
        let name = "swift-nbd-test-\(UUID().uuidString.prefix(8))"
        try await server.start("socat", ["ABSTRACT-LISTEN:\(name),fork", "UNIX-CONNECT:\(try uri.socketPath)"])
        // socat listens a moment after it starts.
        var connected: NBDExport?
        var seen = ""
        try await waitUntil("socat to listen on @\(name)", seen: seen) {
            do {
                connected = try await NBDExport.connect(to: NBDURI("nbd+unix:///?socket=%00\(name)"))
            } catch {
                seen = "\(error)"
            }
            return connected != nil
        }
        let export = try #require(connected)
        let data = pattern(8192, seed: 5)
        try await export.write(data, at: 4096)
        #expect(try await export.read(at: 4096, length: 8192) == data)
        await export.disconnect()
    }

    @Test func thousandRequestsFromSixteenTasksOnOneConnection() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(["memory", "64M"])
        let export = try await NBDExport.connect(to: uri)
        try await thousandRequestsFromSixteenTasks(export)
        await export.disconnect()
    }

    @Test func segmentsPassFromOneExportToAnotherAcrossRequestSplits() async throws {
        let server = try ServerProcess()
        let other = try ServerProcess()
        defer {
            server.stop()
            other.stop()
        }
        // The destination takes at most 64 KiB per request, and errs on anything larger.
        let source = try await server.nbdkit(["memory", "16M"])
        let destination = try await other.nbdkit([
            "--filter=blocksize-policy", "memory", "16M",
            "blocksize-maximum=65536", "blocksize-error-policy=error",
        ])
        let from = try await NBDExport.connect(to: source)
        let to = try await NBDExport.connect(to: destination)
        let data = pattern(3 << 20, seed: 17)
        try await from.write(data, at: 1 << 20)
        let segments = try await from.readSegments(at: 1 << 20, length: 3 << 20)
        #expect(segments.reduce(0) { $0 + $1.readableBytes } == 3 << 20)
        var joined = ByteBuffer()
        for segment in segments { joined.writeImmutableBuffer(segment) }
        #expect(joined == data)
        // Uneven pieces, cut again at 64 KiB on the way out.
        let uneven = [
            data.getSlice(at: 0, length: 1000)!, data.getSlice(at: 1000, length: 200_000)!,
            data.getSlice(at: 201_000, length: (3 << 20) - 201_000)!,
        ]
        try await to.write(segments: uneven, at: 4096)
        #expect(try await to.read(at: 4096, length: 3 << 20) == data)
        try await to.write(segments: segments, at: 8 << 20)
        #expect(try await to.read(at: 8 << 20, length: 3 << 20) == data)
        await from.disconnect()
        await to.disconnect()
    }

    @Test func tasksOnTheExportsExecutorRunOnItsEventLoop() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(["memory", "64M"])
        let export = try await NBDExport.connect(to: uri)
        try await withTaskExecutorPreference(export.taskExecutor) {
            try await thousandRequestsFromSixteenTasks(export)
            // Resumed after the replies on the connection's thread, not on the cooperative pool.
            #expect(MultiThreadedEventLoopGroup.currentEventLoop != nil)
            let data = pattern(1 << 20, seed: 99)
            try await export.write(data, at: 0)
            #expect(MultiThreadedEventLoopGroup.currentEventLoop != nil)
            #expect(try await export.read(at: 0, length: 1 << 20) == data)
        }
        await export.disconnect()
    }

    @Test func cancelledReadLeavesTheConnectionUsable() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        // The log filter, outside the delay, writes a line as the read arrives.
        let log = server.path("reads.log")
        let uri = try await server.nbdkit(["--filter=log", "--filter=delay", "memory", "16M", "delay-read=3", "logfile=\(log)"])
        let export = try await NBDExport.connect(to: uri)
        let slow = Task { try await export.read(at: 0, length: 4096) }
        // Cancelled once on the wire, so that its late reply must be read and dropped.
        try await waitUntil(file: log, holds: " Read ")
        slow.cancel()
        await #expect(throws: CancellationError.self) { _ = try await slow.value }
        let data = pattern(4096, seed: 2)
        try await export.write(data, at: 8192)
        #expect(try await export.read(at: 8192, length: 4096) == data)
        await export.disconnect()
    }

    @Test func infoThenAbort() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(["memory", "16M"])
        let connection = try await NBDConnection.connect(to: uri.address)
        let info = try await connection.info("", requests: [.name, .description, .blockSize])
        #expect(info.size == 16 << 20)
        await connection.abort()
    }
}
