import Foundation
import NBD
import NIOCore
import TestSupport
import Testing

@Suite("nbd copy", .serialized)
struct CopyCommandTests {
    func contents(_ path: String) throws -> Data { try Data(contentsOf: URL(fileURLWithPath: path)) }

    /// Writes `count` bytes of a deterministic pattern, with a hole in the middle, to `path`.
    func makeImage(_ path: String, count: Int) throws -> Data {
        var data = Data(pattern(count, seed: 42).readableBytesView)
        data.replaceSubrange((count / 4)..<(count / 2), with: Data(count: count / 4))
        try data.write(to: URL(fileURLWithPath: path))
        return data
    }

    func expectSuccess(_ arguments: [String], sourceLocation: SourceLocation = #_sourceLocation) throws {
        let result = try runNBD(["copy"] + arguments)
        #expect(result.status == 0, "\(result.error)", sourceLocation: sourceLocation)
    }

    @Test func fileToNBDToFileAndNBDToNBD() async throws {
        let one = try ServerProcess()
        let two = try ServerProcess()
        defer {
            one.stop()
            two.stop()
        }
        let first = try await one.nbdkit(["memory", "32M"]).description
        let second = try await two.nbdkit(["memory", "32M"]).description
        let original = try makeImage(one.path("in.raw"), count: 32 << 20)
        try expectSuccess([one.path("in.raw"), first, "--flush"])
        try expectSuccess([first, second])
        try expectSuccess([second, one.path("out.raw")])
        #expect(try contents(one.path("out.raw")) == original)
        // And nbdcopy agrees on what the second server holds.
        _ = try one.run("nbdcopy", [second, one.path("check.raw")])
        #expect(try contents(one.path("check.raw")) == original)
    }

    @Test func stdinAndStdout() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(["memory", "8M"]).description
        let original = try makeImage(server.path("in.raw"), count: 8 << 20)
        let shell =
            "'\(nbdTool)' copy - '\(uri)' < '\(server.path("in.raw"))' && '\(nbdTool)' copy '\(uri)' - > '\(server.path("out.raw"))'"
        _ = try server.run("sh", ["-c", shell])
        #expect(try contents(server.path("out.raw")) == original)
    }

    @Test func patternSourceReadsBackThroughTheLibrary() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(["memory", "16M"])
        try expectSuccess(["pattern:16M", uri.description])
        let export = try await NBDExport.connect(to: uri)
        var data = try await export.read(at: (8 << 20) + 8, length: 16)
        #expect(data.readInteger(as: UInt64.self) == (8 << 20) + 8)
        #expect(data.readInteger(as: UInt64.self) == (8 << 20) + 16)
        await export.disconnect()
    }

    @Test func sparseGibibyteGivesASparseFile() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(["sparse-random", "1G", "seed=9", "percent=1"]).description
        try expectSuccess([uri, server.path("out.raw")])
        _ = try server.run("nbdcopy", [uri, server.path("check.raw")])
        #expect(try contents(server.path("out.raw")) == (try contents(server.path("check.raw"))))
        let attributes = try FileManager.default.attributesOfItem(atPath: server.path("out.raw"))
        #expect((attributes[.size] as? UInt64) == 1 << 30)
        // Allocated blocks (du): about 1% of the size, far from all of it.
        let usage = String(decoding: try server.run("du", ["-k", server.path("out.raw")]), as: UTF8.self)
        let kib = Int(usage.split(separator: "\t").first ?? "") ?? .max
        #expect(kib < 100 * 1024, "the copy is not sparse: \(usage)")
    }

    /// A sparse file as the source: its holes (found with SEEK_HOLE) are never read (strace
    /// counts the bytes pread returned). Into an export only the data is written; into a new
    /// file, and onto an existing file full of data, the copy is as sparse as the source (the
    /// old data punched out, not overwritten with zero bytes); the content is the same each time.
    @Test func aSparseFileSourceSkipsItsHoles() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let source = server.path("sparse.raw")
        let size = 512 << 20
        _ = try server.run("truncate", ["-s", "\(size)", source])
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: source))
        for (index, offset) in [0, (256 << 20) + 4096, size - (1 << 20)].enumerated() {
            try handle.seek(toOffset: UInt64(offset))
            try handle.write(contentsOf: Data(pattern(1 << 20, seed: UInt8(index + 1)).readableBytesView))
        }
        try handle.close()

        let log = server.path("writes.log")
        let uri = try await server.nbdkit(["--filter=log", "memory", "\(size)", "logfile=\(log)"]).description
        let trace = server.path("reads.trace")
        _ = try server.run("strace", ["-f", "-e", "trace=pread64,preadv2", "-o", trace, nbdTool, "copy", source, uri])
        // pread64(7, "..."..., 262144, 0) = 262144, or "<... pread64 resumed> ...) = 262144" when
        // another thread came between: the data's reads, not the loader's. preadv2 for what
        // the page cache held (RWF_NOWAIT; those it did not hold fail with -1 EAGAIN).
        let read = try String(contentsOfFile: trace, encoding: .utf8).split(separator: "\n")
            .filter { ($0.contains("pread64") || $0.contains("preadv2")) && !$0.contains(".so") }
            .compactMap { Int($0.split(separator: "=").last?.trimmingCharacters(in: .whitespaces) ?? "") }
            .filter { $0 >= 4096 }
            .reduce(0, +)
        #expect(read == 3 << 20, "the source's holes were read: \(read) bytes")
        let written = try String(contentsOfFile: log, encoding: .utf8).split(separator: "\n").filter { $0.contains(" Write id=") }
            .compactMap { $0.split(separator: " ").first { $0.hasPrefix("count=0x") } }
            .reduce(0) { $0 + (Int($1.dropFirst("count=0x".count), radix: 16) ?? 0) }
        #expect(written == 3 << 20, "only the data is written")
        try expectSuccess([uri, server.path("back.raw")])
        #expect(try sameContents(source, server.path("back.raw")))

        // A new file, and an existing one full of data.
        let existing = server.path("existing.raw")
        _ = try server.run("fallocate", ["-l", "\(size)", existing])
        _ = try server.run("sh", ["-c", "tr '\\0' '\\377' < /dev/zero | head -c 64M | dd of=\(existing) conv=notrunc status=none"])
        for destination in [server.path("new.raw"), existing] {
            try expectSuccess([source, destination])
            #expect(try sameContents(source, destination))
            #expect(allocatedBytes(destination) <= 4 << 20, "\(destination) is not sparse: \(allocatedBytes(destination)) bytes")
        }
    }

    @Test func sourceErrorFailsTheCopy() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(["--filter=error", "pattern", "8M", "error-pread=EIO", "error-pread-rate=100%"]).description
        let result = try runNBD(["copy", uri, server.path("out.raw")])
        #expect(result.status == 1)
        #expect(result.error.hasPrefix("nbd: ") && result.error.contains("EIO"), "\(result.error)")
    }

    @Test func smallerDestinationIsRefusedBeforeCopying() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(["memory", "1M"]).description
        let result = try runNBD(["copy", "pattern:2M", uri])
        #expect(result.status == 1)
        #expect(result.error.contains("smaller"))
    }

    @Test func progressOnADescriptor() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(["memory", "8M"]).description
        let result = try runNBD(["copy", "pattern:8M", uri, "--progress=1"])
        #expect(result.status == 0)
        let lines = result.output.split(separator: "\n")
        #expect(lines.last == "100/100")
        #expect(lines.allSatisfy { $0.hasSuffix("/100") })
    }

    /// --target-is-zero (nbdcopy's name) and --destination-is-zero take the destination's word:
    /// zero areas of the source are not written, so what a lying destination held stays.
    @Test(arguments: ["--target-is-zero", "--destination-is-zero", nil])
    func destinationIsZeroSkipsZeroAreas(flag: String?) async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let source = try await server.nbdkit(["data", "data=@65536 1 2 3 4", "size=1M"])
        let destination = try await server.nbdkit(["memory", "1M"])
        try await NBDExport.withExport(destination) { try await $0.write(pattern(1 << 20, seed: 3), at: 0) }
        try expectSuccess([source.description, destination.description] + (flag.map { [$0] } ?? []))
        let copied = try await NBDExport.withExport(destination) { Array(try await $0.read(at: 0, length: 1 << 20).readableBytesView) }
        #expect(copied[65536..<65540] == [1, 2, 3, 4])
        let old = Array(pattern(1 << 20, seed: 3).readableBytesView)
        // The 4 KiB block with data is written whole; every other block is zero in the source.
        #expect(copied[65540..<69632].allSatisfy { $0 == 0 })
        if flag != nil {
            #expect(copied[0..<65536] == old[0..<65536] && copied[69632...] == old[69632...])
        } else {
            #expect(copied.enumerated().allSatisfy { $0.offset >= 65536 && $0.offset < 65540 || $0.element == 0 })
        }
    }

    /// One JSON object a second and a last one, for scripts.
    @Test func progressAsJSON() async throws {
        let result = try runNBD(["copy", "pattern:64M", "null:", "--progress=json"])
        #expect(result.status == 0)
        let objects = try result.error.split(separator: "\n").map {
            try JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] ?? [:]
        }
        let last = try #require(objects.last)
        #expect(last["done"] as? Int == 64 << 20 && last["total"] as? Int == 64 << 20)
        #expect(last["finished"] as? Bool == true && last["rate"] is Int && last["elapsed"] is Double)
        #expect(objects.dropLast().allSatisfy { $0["finished"] as? Bool == false })
    }

    /// On a terminal (script(1) makes one): each redraw clears the rest of the line, and the
    /// last one gives the time taken and the mean rate.
    @Test func progressBarOnATerminal() async throws {
        let command = "'\(nbdTool)' copy pattern:64M null: --progress"
        let result = try runProcess("/bin/sh", ["-c", "script -qec \"\(command)\" /dev/null < /dev/null"])
        #expect(result.status == 0)
        let screen = String(decoding: result.output, as: UTF8.self)
        let redraws = screen.split(separator: "\r").filter { $0.contains("%") }
        let last = try #require(redraws.last)
        #expect(redraws.allSatisfy { $0.contains("\u{1B}[K") }, "\(screen)")
        #expect(last.contains("100% 64.0 MiB of 64.0 MiB, in 0:") && last.contains("/s"), "\(last)")
        #expect(!last.contains("ETA"))
    }

    @Test(arguments: [
        ["copy", "--progress=sometimes", "pattern:1M", "null:"],  // neither json nor a descriptor
        ["copy", "ftp://host/x", "null:"],  // unknown scheme
        ["copy", "nbd+unix:///disk", "null:"],  // missing socket parameter
        ["copy", "pattern:-1", "null:"],  // negative size
        ["copy", "--frobnicate", "pattern:1M", "null:"],  // unknown flag
        ["copy", "pattern:1M", "zero:1M"],  // synthetic destination
        ["copy", "null:", "pattern:1M"],  // null: as a source
        ["copy", "/nonexistent/file", "null:"],  // missing file
    ])
    func badCommandLinesGiveOneLineAndExitOne(arguments: [String]) throws {
        let result = try runNBD(arguments)
        #expect(result.status == 1)
        #expect(result.error.hasPrefix("nbd: "))
        #expect(result.error.split(separator: "\n").count == 1, "\(result.error)")
    }

    /// `nbd copy` and `nbd checksum` take every scheme `nbd info` takes: a vsock URI is dialled,
    /// not refused as unknown. CID 1 is this machine's own vsock loopback, where nothing listens:
    /// each command fails as `nbd info` does, on the connection.
    @Test func vsockURIsAreDialledAsNbdInfoDialsThem() throws {
        let uri = "nbd+vsock://1:10809/"
        for arguments in [["info", uri], ["copy", uri, "null:"], ["copy", "pattern:1M", uri], ["checksum", uri]] {
            let result = try runNBD(arguments)
            #expect(result.status == 1 && result.error.hasPrefix("nbd: cannot connect to vsock:1:10809"), "\(arguments): \(result.error)")
        }
    }
}

extension CopyCommandTests {
    @Test func interruptDrainsAndSaysSo() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        // Every read takes half a second: the copy is still running when Ctrl-C comes. The log
        // filter, outside the delay, writes a line as each read arrives.
        let log = server.path("reads.log")
        let uri = try await server.nbdkit(["--filter=log", "--filter=delay", "pattern", "64M", "delay-read=500ms", "logfile=\(log)"])
        let process = Process()
        process.executableURL = URL(fileURLWithPath: nbdTool)
        process.arguments = ["copy", uri.description, "null:"]
        let errors = Pipe()
        process.standardError = errors
        try process.run()
        // Ctrl-C once the copy is under way: its first read has reached the server.
        try await waitUntil(file: log, holds: " Read ")
        kill(process.processIdentifier, SIGINT)
        let message = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        try await process.exited()
        #expect(process.terminationStatus == 130)
        #expect(message.hasPrefix("nbd: interrupted"), "\(message)")
    }
}

extension CopyCommandTests {

    /// --allocated (nbdcopy's name): zero areas are written, to a file and through qemu-nbd to a
    /// raw file (with NBD_CMD_FLAG_NO_HOLE), so the copy takes its whole size on disk; without it
    /// the copy stays sparse. The data is the same either way.
    @Test func allocatedLeavesNoHoles() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let source = try await server.nbdkit(["data", "data=@65536 1 2 3 4 @4000000 5", "size=8M"]).description
        _ = try server.run("nbdcopy", [source, server.path("expected.raw")])
        let expected = try contents(server.path("expected.raw"))
        try expectSuccess([source, server.path("sparse.raw")])
        try expectSuccess(["--allocated", source, server.path("full.raw")])
        #expect(try contents(server.path("sparse.raw")) == expected)
        #expect(try contents(server.path("full.raw")) == expected)
        #expect(allocatedBytes(server.path("sparse.raw")) < 1 << 20)
        #expect(allocatedBytes(server.path("full.raw")) >= 8 << 20)

        let image = server.path("qemu.raw")
        _ = try server.run("truncate", ["-s", "8M", image])
        let socket = server.path("qemu.sock")
        try await server.start("qemu-nbd", ["-k", socket, "-t", "-f", "raw", "--discard=unmap", image], waitFor: socket)
        try expectSuccess(["--allocated", source, NBDURI(socket: socket).description])
        #expect(try contents(image) == expected)
        #expect(allocatedBytes(image) >= 8 << 20)
    }
}

extension CopyCommandTests {
    /// Between two exports the copy holds its workers' buffers, `--memory` (24 MiB by default)
    /// of them, and nothing else: no receive buffers kept alive by data waiting to be written.
    /// Measured against the same binary's memory for `nbd info`, with nbdcopy's beside it.
    @Test func copyBetweenExportsHoldsItsMemoryBoundAndNoMore() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        // 256 MiB, ten times the bound: receive buffers kept alive would show well past it.
        let source = try await server.nbdkit(["memory", "256M"]).description
        let destination = try await server.nbdkit(["memory", "256M"]).description
        #expect(try runNBD(["copy", "pattern:256M", source]).status == 0)
        let nbdcopy = try peakMemory(try ServerProcess.executable("nbdcopy"), [source, destination])
        let baseline = try peakMemory(nbdTool, ["info", source])
        for (arguments, bound) in [([String](), 24), (["--memory", "8M"], 8)] {
            let copy = try peakMemory(nbdTool, ["copy"] + arguments + [source, destination])
            #expect(copy.status == 0 && nbdcopy.status == 0 && baseline.status == 0)
            // The bound, and 8 MiB for what a copy needs beyond what `nbd info` does.
            let extra = (copy.peakKiB - baseline.peakKiB) >> 10
            let figures = "nbd info \(baseline.peakKiB >> 10) MiB, nbdcopy \(nbdcopy.peakKiB >> 10) MiB"
            #expect(extra <= bound + 8, "nbd copy \(arguments): \(copy.peakKiB >> 10) MiB, \(figures)")
        }
    }
}
