import Foundation
import NBD
@_spi(NBDMachines) import NBDCore
import NBDServer
import NIOCore
import NIOPosix
import TestSupport
import Testing

/// The built-in server against libnbd's tools, qemu-img and our own client.
@Suite("Built-in server", .serialized)
struct BuiltInServerTests {
    /// Serves `exports` on a Unix socket in the test's folder.
    func serve(_ folder: ServerProcess, _ exports: [NBDServerExport]) async throws -> (NBDServer, String) {
        let socket = folder.path("builtin.sock")
        return (try await NBDServer.start(exports: exports, on: .unix(path: socket)), socket)
    }

    @Test func nbdinfoSeesWhatWasWrittenAndItsHoles() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let (server, socket) = try await serve(
            folder,
            [
                NBDServerExport(name: "a", description: "first", backend: MemoryBackend(size: 64 << 20)),
                NBDServerExport(name: "b", backend: MemoryBackend(size: 1 << 40, readOnly: true)),
            ]
        )
        let uri = NBDURI(socket: socket, exportName: "a")
        let export = try await NBDExport.connect(to: uri)
        try await export.write(pattern(1 << 20, seed: 1), at: 8 << 20)
        await export.disconnect()
        let list = String(decoding: try folder.run("nbdinfo", ["--list", "--json", uri.description]), as: UTF8.self)
        #expect(list.contains("\"export-name\": \"a\"") && list.contains("\"export-name\": \"b\""))
        #expect(list.contains("\"description\": \"first\""))
        #expect(
            try nbdinfoMap(folder, uri) == [
                MapEntry(offset: 0, length: 8 << 20, type: 3), MapEntry(offset: 8 << 20, length: 1 << 20, type: 0),
                MapEntry(offset: 9 << 20, length: 55 << 20, type: 3),
            ]
        )
        // 1 TiB in memory costs nothing until written.
        let huge = String(
            decoding: try folder.run("nbdinfo", ["--json", NBDURI(socket: socket, exportName: "b").description]),
            as: UTF8.self
        )
        #expect(huge.contains("\"export-size\": 1099511627776") && huge.contains("\"is_read_only\": true"))
        await server.shutdown()
    }

    /// `nbd resize` and `nbd info` on a resizable export; libnbd's nbdinfo, which knows nothing
    /// of the extension, sees each new size.
    @Test func nbdResizeGrowsAndShrinksOnlyWithYes() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let (server, socket) = try await serve(folder, [NBDServerExport(backend: MemoryBackend(size: 1 << 20), resizableUpTo: 4 << 20)])
        let uri = NBDURI(socket: socket).description
        let info = try runNBD(["info", "--json", uri])
        #expect(info.status == 0 && info.output.contains("\"can_resize\": true"))
        #expect(try runNBD(["info", "--can", "resize", uri]).status == 0)
        let grow = try runNBD(["resize", uri, "3M"])
        #expect(grow.status == 0, "\(grow.error)")
        #expect(String(decoding: try folder.run("nbdinfo", ["--size", uri]), as: UTF8.self) == "3145728\n")
        // A shrink destroys data: without a terminal to ask on, only with -y.
        let refused = try runNBD(["resize", uri, "512K"])
        #expect(refused.status == 1 && refused.error == "nbd: refusing to shrink without -y: standard input is not a terminal to ask on\n")
        #expect(try runNBD(["info", "--size", uri]).output == "3145728\n")
        #expect(try runNBD(["resize", "-y", uri, "512K"]).status == 0)
        #expect(String(decoding: try folder.run("nbdinfo", ["--size", uri]), as: UTF8.self) == "524288\n")
        let unaligned = try runNBD(["resize", uri, "9000000T"])
        #expect(unaligned.status == 1 && unaligned.error.contains("too large"))
        // Past the export's maximum: refused, and the size is what it was.
        let past = try runNBD(["resize", uri, "100T"])
        #expect(past.status == 1 && past.error.contains("over the export's maximum of 4194304"), "\(past.error)")
        #expect(String(decoding: try folder.run("nbdinfo", ["--size", uri]), as: UTF8.self) == "524288\n")
        await server.shutdown()

        let (fixed, fixedSocket) = try await serve(folder, [NBDServerExport(name: "fixed", backend: MemoryBackend(size: 1 << 20))])
        let fixedURI = NBDURI(socket: fixedSocket, exportName: "fixed").description
        #expect(try runNBD(["info", "--can", "resize", fixedURI]).status == 2)
        // Every can_* key, true or false, as nbdinfo prints them.
        #expect(try runNBD(["info", fixedURI]).output.contains("\tcan_resize: false\n"))
        #expect(try runNBD(["info", "--json", fixedURI]).output.contains("\"can_resize\": false,"))
        let notResizable = try runNBD(["resize", fixedURI, "2M"])
        #expect(notResizable.status == 1 && notResizable.error.contains("does not set NBD_FLAG_SEND_RESIZE"))
        await fixed.shutdown()
        let both = try runNBD(["serve", "--memory", "1M", "--resizable", "2M", "--read-only"])
        #expect(both.status != 0 && both.error.contains("--resizable and --read-only do not go together"))
        // A resizable export always has a maximum, at least its size.
        let unbounded = try runNBD(["serve", "--memory", "1M", "--resizable"])
        #expect(unbounded.status != 0 && unbounded.error.contains("--resizable"), "\(unbounded.error)")
        let below = try runNBD(["serve", "--memory", "1M", "--resizable", "512K"])
        #expect(below.status != 0 && below.error.contains("is less than the --memory size"), "\(below.error)")
    }

    @Test func nbdcopyBothWaysByContent() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let (server, socket) = try await serve(folder, [NBDServerExport(backend: MemoryBackend(size: 32 << 20))])
        let uri = NBDURI(socket: socket).description
        var original = Data(pattern(32 << 20, seed: 3).readableBytesView)
        original.replaceSubrange((4 << 20)..<(12 << 20), with: Data(count: 8 << 20))
        try original.write(to: URL(fileURLWithPath: folder.path("in.raw")))
        _ = try folder.run("nbdcopy", [folder.path("in.raw"), uri])
        _ = try folder.run("nbdcopy", [uri, folder.path("out.raw")])
        #expect(try Data(contentsOf: URL(fileURLWithPath: folder.path("out.raw"))) == original)
        await server.shutdown()
    }

    @Test func qemuImgInfoAndConvert() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let (server, socket) = try await serve(folder, [NBDServerExport(name: "disk", backend: MemoryBackend(size: 16 << 20))])
        let uri = NBDURI(socket: socket, exportName: "disk").description
        let info = String(decoding: try folder.run("qemu-img", ["info", uri]), as: UTF8.self)
        #expect(info.contains("16 MiB"))
        _ = try folder.run("qemu-img", ["create", "-f", "qcow2", folder.path("src.qcow2"), "16M"])
        _ = try folder.run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x5a 1M 2M", folder.path("src.qcow2")])
        _ = try folder.run("qemu-img", ["convert", "-n", "-f", "qcow2", "-O", "raw", folder.path("src.qcow2"), uri])
        _ = try folder.run("qemu-img", ["convert", "-f", "raw", "-O", "raw", uri, folder.path("back.raw")])
        let back = try Data(contentsOf: URL(fileURLWithPath: folder.path("back.raw")))
        #expect(back.count == 16 << 20)
        #expect(back[(1 << 20)..<(3 << 20)].allSatisfy { $0 == 0x5a })
        #expect(back[0..<(1 << 20)].allSatisfy { $0 == 0 })
        await server.shutdown()
    }

    @Test func ourClientWithSixteenTasksEveryByteVerified() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let (server, socket) = try await serve(folder, [NBDServerExport(backend: MemoryBackend(size: 64 << 20))])
        try await walkthrough(folder, NBDURI(socket: socket), listed: [""])
        let export = try await NBDExport.connect(to: NBDURI(socket: socket))
        try await thousandRequestsFromSixteenTasks(export)
        await export.disconnect()
        await server.shutdown()
    }

    @Test func fileBackendMapsItsHolesLikeNbdinfo() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        _ = try folder.run("truncate", ["-s", "32M", folder.path("disk.raw")])
        _ = try folder.run(
            "dd",
            ["if=/dev/urandom", "of=\(folder.path("disk.raw"))", "bs=1M", "seek=5", "count=2", "conv=notrunc", "status=none"]
        )
        let (server, socket) = try await serve(folder, [NBDServerExport(backend: try FileBackend(path: folder.path("disk.raw")))])
        let uri = NBDURI(socket: socket)
        let map = try nbdinfoMap(folder, uri)
        #expect(map.contains { $0.type == 0 && $0.offset <= 5 << 20 && $0.offset + $0.length >= 7 << 20 })
        #expect(map.contains { $0.type == 3 })
        let export = try await NBDExport.connect(to: uri)
        #expect(try await mapExport(export, context: "base:allocation") == map)
        let data = pattern(65536, seed: 8)
        try await export.write(data, at: 20 << 20)
        try await export.flush()
        #expect(try await export.read(at: 20 << 20, length: 65536) == data)
        await export.disconnect()
        await server.shutdown()
    }

    @Test func badClientsAreDisconnectedAndOthersGoOn() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let (server, socket) = try await serve(folder, [NBDServerExport(backend: MemoryBackend(size: 1 << 20))])
        let good = try await NBDExport.connect(to: NBDURI(socket: socket))
        // Garbage instead of client flags, an oversized option, an oversized write: each closed.
        let garbage = ByteBuffer(bytes: [0xff, 0xff, 0xff, 0xff])
        var hugeOption = ByteBuffer()
        hugeOption.writeMultipleIntegers(UInt32(1), NBDMagic.haveOption, OptionCode.list.rawValue, UInt32(1 << 30))
        for bytes in [garbage, hugeOption] {
            #expect(try await rawSessionIsClosed(socket: socket, sending: bytes))
        }
        // The good client was not disturbed.
        let data = pattern(4096, seed: 4)
        try await good.write(data, at: 0)
        #expect(try await good.read(at: 0, length: 4096) == data)
        await good.disconnect()
        await server.shutdown()
    }

    /// Connects, reads the greeting, sends `bytes`, and tells whether the server then closes.
    func rawSessionIsClosed(socket: String, sending bytes: ByteBuffer) async throws -> Bool {
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton).connect(unixDomainSocketPath: socket).get()
        try await channel.writeAndFlush(bytes)
        let closed = (try? await waitUntil("the server to close the connection") { !channel.isActive }) != nil
        try? await channel.close()
        return closed
    }
}

extension BuiltInServerTests {
    @Test func badRequestsGetTheSpecsErrorsAndTheConnectionGoesOn() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let (server, socket) = try await serve(folder, [NBDServerExport(backend: MemoryBackend(size: 1 << 20))])
        let client = try await RawClient(socket: socket)
        try await client.enterTransmission()
        // Past the end: EINVAL. Unknown flags: EINVAL. Unknown command: EINVAL.
        #expect(try await client.request(RequestHeader(type: .read, cookie: 1, offset: 1 << 20, length: 512)) == NBDErrno.EINVAL.rawValue)
        #expect(
            try await client.request(RequestHeader(flags: CommandFlags(rawValue: 0x40), type: .flush, cookie: 2, offset: 0, length: 0))
                == NBDErrno.EINVAL.rawValue
        )
        #expect(
            try await client.request(RequestHeader(type: CommandType(rawValue: 99), cookie: 3, offset: 0, length: 0))
                == NBDErrno.EINVAL.rawValue
        )
        // Still usable: a write and a flush succeed.
        #expect(try await client.request(RequestHeader(type: .write, cookie: 4, offset: 0, length: 4), payload: [1, 2, 3, 4]) == 0)
        #expect(try await client.request(RequestHeader(type: .flush, cookie: 5, offset: 0, length: 0)) == 0)
        // A write larger than the maximum payload cannot be waited for: hard disconnect.
        try await client.send { RequestHeader(type: .write, cookie: 6, offset: 0, length: 64 << 20).encode(into: &$0) }
        #expect(try await client.isClosedByServer())
        await server.shutdown()
    }

    @Test func clientVanishingMidWriteDisturbsNobody() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let (server, socket) = try await serve(folder, [NBDServerExport(backend: MemoryBackend(size: 1 << 20))])
        let good = try await NBDExport.connect(to: NBDURI(socket: socket))
        let rude = try await RawClient(socket: socket)
        try await rude.enterTransmission()
        try await rude.send {
            RequestHeader(type: .write, cookie: 1, offset: 0, length: 65536).encode(into: &$0)
            $0.writeRepeatingByte(9, count: 1000)
        }
        await rude.close()
        let data = pattern(65536, seed: 6)
        try await good.write(data, at: 0)
        #expect(try await good.read(at: 0, length: 65536) == data)
        await good.disconnect()
        await server.shutdown()
    }

    @Test func aWriteArrivingInPiecesEndsWhereItsHeaderSays() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let (server, socket) = try await serve(folder, [NBDServerExport(backend: MemoryBackend(size: 1 << 20))])
        let client = try await RawClient(socket: socket)
        try await client.enterTransmission()
        // 5,000 bytes (no power of two) in two pieces; the second piece shares its packet with
        // the next request, which must not be taken for data.
        let payload = (0..<5000).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 1) }
        try await client.send {
            RequestHeader(type: .write, cookie: 1, offset: 4096, length: 5000).encode(into: &$0)
            $0.writeBytes(payload.prefix(3000))
        }
        // A pause on purpose, so that the two pieces tend to arrive apart.
        try await Task.sleep(for: .milliseconds(50))
        try await client.send {
            $0.writeBytes(payload.suffix(2000))
            RequestHeader(type: .read, cookie: 2, offset: 4096, length: 5000).encode(into: &$0)
        }
        #expect(try await client.simpleReply() == SimpleReplyHeader(cookie: 1))
        #expect(try await client.simpleReply() == SimpleReplyHeader(cookie: 2))
        #expect(Array(try await client.read(5000).readableBytesView) == payload)
        await client.close()
        await server.shutdown()
    }

    @Test func aWriteSentAFewBytesAtATimeArrivesWhole() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let (server, socket) = try await serve(folder, [NBDServerExport(backend: MemoryBackend(size: 1 << 20))])
        let client = try await RawClient(socket: socket)
        try await client.enterTransmission()
        // More pieces than the server keeps as slices: it gathers them.
        let payload = (0..<6000).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 1) }
        try await client.send { RequestHeader(type: .write, cookie: 1, offset: 0, length: 6000).encode(into: &$0) }
        for start in stride(from: 0, to: 6000, by: 300) {
            try await client.send { $0.writeBytes(payload[start..<(start + 300)]) }
            // A pause on purpose, so that the pieces tend to arrive apart.
            try await Task.sleep(for: .milliseconds(5))
        }
        #expect(try await client.simpleReply() == SimpleReplyHeader(cookie: 1))
        await client.close()
        let export = try await NBDExport.connect(to: NBDURI(socket: socket))
        #expect(Array(try await export.read(at: 0, length: 6000).readableBytesView) == payload)
        await export.disconnect()
        await server.shutdown()
    }

    @Test func clientsPastTheConnectionLimitAreTurnedAway() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        var configuration = NBDServer.Configuration()
        configuration.maximumConnections = 2
        let socket = folder.path("limited.sock")
        let server = try await NBDServer.start(
            exports: [NBDServerExport(backend: MemoryBackend(size: 1 << 20))],
            on: .unix(path: socket),
            configuration: configuration
        )
        let uri = NBDURI(socket: socket)
        let first = try await NBDExport.connect(to: uri)
        let second = try await NBDExport.connect(to: uri)
        await #expect { _ = try await NBDExport.connect(to: uri) } throws: { ($0 as? NBDError)?.code == .connectionClosed }
        // The two admitted are unaffected, and a place freed is taken again.
        #expect(try await second.read(at: 0, length: 4096) == ByteBuffer(repeating: 0, count: 4096))
        await first.disconnect()
        // The server sees the first go a moment later: until then the third is still refused.
        var third: NBDExport?
        var seen = ""
        try await waitUntil("a third connection to be admitted", seen: seen) {
            do { third = try await NBDExport.connect(to: uri) } catch { seen = "\(error)" }
            return third != nil
        }
        await third?.disconnect()
        await second.disconnect()
        await server.shutdown()
    }

    @Test func shutdownFinishesRequestsInFlight() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let (server, socket) = try await serve(folder, [NBDServerExport(backend: MemoryBackend(size: 64 << 20))])
        let export = try await NBDExport.connect(to: NBDURI(socket: socket))
        let writes = Task {
            try await withThrowingTaskGroup(of: Void.self) { group in
                for index in 0..<32 {
                    group.addTask { try await export.write(pattern(1 << 20, seed: UInt8(index)), at: UInt64(index) << 20) }
                }
                try await group.waitForAll()
            }
        }
        // A pause on purpose: the shutdown comes while the writes are going, at whatever point.
        try await Task.sleep(for: .milliseconds(5))
        await server.shutdown()
        // Every write either completed or was refused with ESHUTDOWN / a closed connection:
        // none is left hanging.
        _ = await writes.result
        #expect(!(try await RawClientProbe.canConnect(socket)))
    }

    @Test func nbdshScriptedSession() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let (server, socket) = try await serve(folder, [NBDServerExport(backend: MemoryBackend(size: 16 << 20))])
        let script = """
            h.pwrite(b"A" * 65536, 1048576)
            assert h.pread(65536, 1048576) == b"A" * 65536
            h.zero(4096, 1048576)
            assert h.pread(4096, 1048576) == bytes(4096)
            h.trim(65536, 2097152)
            h.flush()
            seen = []
            def extent(metacontext, offset, entries, err):
                seen.extend(entries)
            h.block_status(16777216, 0, extent)
            assert seen[0] == 1048576 and seen[1] & 3 == 3, seen
            print("ok")
            """
        let uri = NBDURI(socket: socket).description
        // nbdsh imports Debian's python3 module: Debian's python3 goes first on PATH.
        let output = try folder.run(
            "env",
            ["PATH=/usr/bin:/bin", try ServerProcess.executable("nbdsh"), "--base-allocation", "-u", uri, "-c", script]
        )
        #expect(String(decoding: output, as: UTF8.self).contains("ok"))
        await server.shutdown()
    }

    @Test func qemuIoWritesAndVerifies() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let (server, socket) = try await serve(folder, [NBDServerExport(backend: MemoryBackend(size: 16 << 20))])
        let uri = NBDURI(socket: socket).description
        let output = String(
            decoding: try folder.run(
                "qemu-io",
                [
                    "-f", "raw", "-c", "write -P 0x33 64k 128k", "-c", "read -P 0x33 64k 128k",
                    "-c", "read -P 0 0 64k", uri,
                ]
            ),
            as: UTF8.self
        )
        #expect(!output.contains("fail"), "\(output)")
        #expect(output.contains("read 131072/131072 bytes"))
        await server.shutdown()
    }

    @Test func serveCommandWithSeveralExportsStopsCleanly() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        _ = try folder.run("truncate", ["-s", "8M", folder.path("disk.raw")])
        let socket = folder.path("serve.sock")
        let process = try await folder.start(
            nbdTool,
            [
                "serve", "--memory", "16M", "--name", "a", "--description", "first",
                "--export", "b=memory:1M", "--export", "c=\(folder.path("disk.raw"))",
                "--socket", socket,
            ],
            waitFor: socket
        )
        let list = String(decoding: try folder.run("nbdinfo", ["--list", NBDURI(socket: socket).description]), as: UTF8.self)
        #expect(list.contains("export=\"a\"") && list.contains("export=\"b\"") && list.contains("export=\"c\""))
        let export = try await NBDExport.connect(to: NBDURI(socket: socket, exportName: "c"))
        let data = pattern(65536, seed: 2)
        try await export.write(data, at: 0)
        await export.disconnect()
        kill(process.processIdentifier, SIGTERM)
        try await process.exited()
        #expect(process.terminationStatus == 0)
        let written = try Data(contentsOf: URL(fileURLWithPath: folder.path("disk.raw")))
        #expect(written.prefix(65536) == Data(data.readableBytesView))
    }
}

enum RawClientProbe {
    /// Whether anything still listens on `socket`.
    static func canConnect(_ socket: String) async throws -> Bool {
        do {
            let client = try await RawClient(socket: socket)
            await client.close()
            return true
        } catch {
            return false
        }
    }
}

extension BuiltInServerTests {
    @Test func structuredReadsSendHolesAsHoleChunks() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let (server, socket) = try await serve(folder, [NBDServerExport(backend: MemoryBackend(size: 1 << 20))])
        let export = try await NBDExport.connect(to: NBDURI(socket: socket))
        #expect(export.structuredReplies)
        let data = pattern(65536, seed: 12)
        try await export.write(data, at: 65536)
        // A hole page, a data page, a hole page: zero-filled by the client from hole chunks.
        let back = try await export.read(at: 0, length: 3 * 65536)
        var expected = ByteBuffer(repeating: 0, count: 65536)
        expected.writeImmutableBuffer(data)
        expected.writeRepeatingByte(0, count: 65536)
        #expect(back == expected)
        await export.disconnect()
        await server.shutdown()
    }
}
