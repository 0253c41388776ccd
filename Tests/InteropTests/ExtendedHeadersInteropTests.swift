import Foundation
import Logging
import NBD
import NBDServer
import NIOConcurrencyHelpers
import NIOCore
import Testing

/// Extended headers against the peers that speak them: qemu 10 (qemu-nbd, qemu-img, qemu-io)
/// and libnbd 1.22 (nbdinfo, nbdcopy, nbdsh), from the Debian trixie chroot of scripts/chroot.sh.
@Suite("Extended headers against qemu 10 and libnbd 1.22", .serialized)
struct ExtendedHeadersInteropTests {
    /// Starts trixie's qemu-nbd on a socket of the folder, with `arguments` before the image.
    func qemuNBD(_ folder: ServerProcess, _ arguments: [String]) async throws -> NBDURI {
        let socket = folder.path("qemu10.sock")
        try await folder.start("trixie:qemu-nbd", ["-k", socket, "-t", "-e", "4"] + arguments, waitFor: socket)
        return NBDURI(socket: socket)
    }

    /// A configuration whose logger counts the requests sent, by command.
    func counting() -> (NBDClientConfiguration, NIOLockedValueBox<[String]>) {
        let requests = NIOLockedValueBox<[String]>([])
        var configuration = NBDClientConfiguration()
        configuration.logger = Logger(label: "count") { _ in RequestCounter(requests: requests) }
        configuration.logger.logLevel = .trace
        return (configuration, requests)
    }

    @Test func ourClientAgainstQemuNBD10OnAQcow2PastFourGiB() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        _ = try folder.run("trixie:qemu-img", ["create", "-q", "-f", "qcow2", "disk.qcow2", "8G"])
        _ = try folder.run("trixie:qemu-img", ["bitmap", "--add", "disk.qcow2", "b0"])
        _ = try folder.run("trixie:qemu-io", ["-f", "qcow2", "-c", "write -P 0x5a 5G 1M", "disk.qcow2"])
        let uri = try await qemuNBD(folder, ["-f", "qcow2", "-B", "b0", folder.path("disk.qcow2")])
        var configuration = NBDClientConfiguration()
        configuration.metaContexts = [.baseAllocation, .dirtyBitmap("b0")]
        try await NBDExport.withExport(uri, configuration: configuration) { export in
            #expect(export.transmissionFormat == .extended)
            #expect(export.size == 8 << 30)
            let written = try await export.read(at: 5 << 30, length: 1 << 20)
            #expect(written == ByteBuffer(repeating: 0x5a, count: 1 << 20))
            // Ours, past 4 GiB, read back by content.
            let data = pattern(3 << 20, seed: 9)
            try await export.write(data, at: (6 << 30) + 4096)
            #expect(try await export.read(at: (6 << 30) + 4096, length: 3 << 20) == data)
            try await export.flush()
        }
        let bitmap = NBDMetaContext.dirtyBitmap("b0")
        let (allocation, dirty) = try await NBDExport.withExport(uri, configuration: configuration) { export in
            (try await mapExport(export, context: .baseAllocation), try await mapExport(export, context: bitmap))
        }
        #expect(allocation == (try nbdinfoMap122(folder, uri)))
        #expect(dirty == (try nbdinfoMap122(folder, uri, context: bitmap.name)))
        #expect(dirty.contains { $0.offset == 6 << 30 && $0.type == 1 })
    }

    @Test func aTerabyteIsZeroedTrimmedAndMappedInOneRequestEach() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        _ = try folder.run("truncate", ["-s", "1T", folder.path("huge.raw")])
        let uri = try await qemuNBD(folder, ["-f", "raw", "--discard=unmap", folder.path("huge.raw")])
        let (configuration, requests) = counting()
        try await NBDExport.withExport(uri, configuration: configuration) { export in
            #expect(export.transmissionFormat == .extended)
            try await export.write(pattern(1 << 20, seed: 2), at: 600 << 30)
            requests.withLockedValue { $0 = [] }
            try await export.writeZeroes(at: 0, length: 1 << 40)
            try await export.trim(at: 0, length: 1 << 40)
            #expect(requests.withLockedValue { $0 } == ["NBD_CMD_WRITE_ZEROES 1099511627776", "NBD_CMD_TRIM 1099511627776"])
            try await export.write(pattern(1 << 20, seed: 3), at: 700 << 30)
            requests.withLockedValue { $0 = [] }
            let ours = try await mapExport(export, context: .baseAllocation)
            let theirs = try nbdinfoMap122(folder, uri)
            #expect(ours == theirs)
            #expect(ours.contains { $0.offset == 700 << 30 && $0.type == 0 })
            // The whole terabyte asked for at once; qemu answers in as many extents as it likes.
            #expect(requests.withLockedValue { $0.first } == "NBD_CMD_BLOCK_STATUS 1099511627776")
        }
    }

    @Test func nbdInfoPrintsWhatNbdinfo122Prints() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        _ = try folder.run("truncate", ["-s", "5G", folder.path("disk.raw")])
        let uri = try await qemuNBD(folder, ["-f", "raw", "-x", "disk", folder.path("disk.raw")])
        var exportURI = uri
        exportURI.exportName = "disk"
        let server = try await NBDServer.start(
            exports: [NBDServerExport(name: "mem", backend: MemoryBackend(size: 6 << 30))],
            on: .unix(path: folder.path("ours.sock"))
        )
        defer { Task { await server.shutdown() } }
        for target in [exportURI.description, NBDURI(socket: folder.path("ours.sock"), exportName: "mem").description] {
            for arguments in [[target], ["--json", target], ["--map", target]] {
                let ours = try runNBD(["info"] + arguments)
                #expect(ours.status == 0, "\(ours.error)")
                let theirs = String(decoding: try folder.run("trixie:nbdinfo", arguments), as: UTF8.self)
                    .split(separator: "\n", omittingEmptySubsequences: false).filter { !$0.contains("content") }.joined(separator: "\n")
                #expect(asNbdinfoPrintsIt(ours.output) == theirs, "nbd info \(arguments.joined(separator: " "))")
            }
            #expect(try runNBD(["info", "--has", "extended-headers", target]).status == 0)
            #expect(try runNBD(["info", "--can", "block-status-payload", target]).status == 0)
        }
        #expect(try runNBD(["info", "--json", exportURI.description]).output.contains("\"extended\": true"))
    }

    @Test func ourServerAgainstLibnbd122() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let size: UInt64 = (4 << 30) + (64 << 20)
        let backend = TestBackend(size: size)
        let socket = folder.path("ours.sock")
        let server = try await NBDServer.start(exports: [NBDServerExport(backend: backend)], on: .unix(path: socket))
        defer { Task { await server.shutdown() } }
        let uri = NBDURI(socket: socket).description
        let info = String(decoding: try folder.run("trixie:nbdinfo", ["--json", uri]), as: UTF8.self)
        #expect(info.contains("\"extended\": true") && info.contains("\"can_block_status_payload\": true"))

        // nbdcopy both ways, data past 4 GiB, compared byte for byte (the data, and zeroes
        // everywhere else).
        _ = try folder.run("truncate", ["-s", "\(size)", folder.path("in.raw")])
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: folder.path("in.raw")))
        try handle.seek(toOffset: (4 << 30) + (8 << 20))
        try handle.write(contentsOf: Data(pattern(4 << 20, seed: 4).readableBytesView))
        try handle.close()
        _ = try folder.run("trixie:nbdcopy", [folder.path("in.raw"), uri])
        _ = try folder.run("trixie:nbdcopy", [uri, folder.path("out.raw")])
        #expect(try sameContents(folder.path("in.raw"), folder.path("out.raw")))

        // nbdsh: extended headers, 64-bit block status and a 4 GiB zero in one request.
        backend.effects.withLockedValue { $0 = [] }
        let script = """
            h.add_meta_context("base:allocation")
            h.connect_uri("\(uri)")
            assert h.get_extended_headers_negotiated()
            h.zero(4 * 2**30 + 2**20, 0)
            seen = []
            def extents(metacontext, offset, entries, err):
                seen.extend(entries)
            h.block_status_64(2**32 + 2**20, 0, extents)
            print(sum(length for length, flags in seen), seen[0][1])
            h.shutdown()
            """
        let output = String(decoding: try folder.run("trixie:nbdsh", ["-c", script]), as: UTF8.self)
        #expect(backend.effects.withLockedValue { $0 } == ["zero 4296015872"])
        // The zeroed gigabytes read back as a hole, in one 64-bit extent.
        #expect(output.trimmingCharacters(in: .whitespacesAndNewlines).hasSuffix(" 3"))
    }

    @Test func ourServerAgainstQemu10() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let socket = folder.path("ours.sock")
        let server = try await NBDServer.start(exports: [NBDServerExport(backend: MemoryBackend(size: 8 << 30))], on: .unix(path: socket))
        defer { Task { await server.shutdown() } }
        let uri = NBDURI(socket: socket).description
        let io = String(
            decoding: try folder.run(
                "trixie:qemu-io",
                [
                    "-f", "raw", "-c", "write -P 0x3c 5G 2M", "-c", "read -P 0x3c 5G 2M", "-c", "write -z 6G 1G", "-c", "read -P 0 6G 1M",
                    uri,
                ]
            ),
            as: UTF8.self
        )
        #expect(!io.contains("Pattern verification failed") && io.contains("read 2097152/2097152"))
        let map = String(decoding: try folder.run("trixie:qemu-img", ["map", "--output=json", "-f", "raw", uri]), as: UTF8.self)
        #expect(map.contains("\"start\": 5368709120, \"length\": 2097152") && map.contains("\"data\": true"))
    }
}

/// `nbdinfo --map --json` from libnbd 1.22.
func nbdinfoMap122(_ server: ServerProcess, _ uri: NBDURI, context: String = "base:allocation") throws -> [MapEntry] {
    let data = try server.run("trixie:nbdinfo", ["--map=\(context)", "--json", uri.description])
    return try JSONDecoder().decode([MapEntry].self, from: data)
}

/// Counts the client's "request" trace messages as "COMMAND LENGTH".
struct RequestCounter: LogHandler {
    let requests: NIOLockedValueBox<[String]>
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        guard event.message == "request", let command = event.metadata?["command"], let length = event.metadata?["length"] else { return }
        requests.withLockedValue { $0.append("\(command) \(length)") }
    }
}
