import Foundation
import NBD
import NBDServer
import NIOCore
import Testing

/// `nbd checksum` and `nbd copy --blkhash` / `--verify`: the digests nbdcopy 1.24 prints.
@Suite("blkhash: nbd checksum, nbd copy --blkhash and --verify", .serialized)
struct BlockHashTests {
    /// nbdkit plugins, a blkhash and what `nbdcopy --blkhash=SPEC URI null:` from libnbd 1.24
    /// printed for them (run in a Debian sid chroot; see DEVELOPERS.md).
    static let knownAnswers: [(plugin: [String], blkhash: String, digest: String)] = [
        (["pattern", "1M"], "sha256", "516b9cc336368a4302005a1ba67c14e5eeb57f4888492a1920aaa7d0878c0272"),
        (["pattern", "1M"], "md5/512", "92f1f4d440db39a2ac6c3ccdca9b017f"),
        (["pattern", "1M"], "sha1/4k", "2598cd6e5d0105440feb02bc7b250d81434e3fcf"),
        (
            ["pattern", "1M"], "sha512/1M",
            "a9600dc0f9cf0e077d68e40b8a8ce46794949a1bafb50992e15a1f6852bbdd6b"
                + "0e6a298f6db42ab3d45a67a8a72a707ebf2bbd53178207cfb987c7d5291f362e"
        ),
        // Not a multiple of the block size; a block larger than the image.
        (["pattern", "200001"], "sha256", "5551258cabc9eaf6a7f941c488cf225db69aa888e7c8604a727bb247e9346239"),
        (["pattern", "200001"], "sha256/4k", "45241c4903f40b3d429451095da2ef32a6512f870a948b8fe0ab2aff537863b9"),
        (["pattern", "200001"], "md5/1M", "35d77538bba2ce92fbc6c726684450e9"),
        // An empty export.
        (["null", "0"], "sha256", "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"),
        (["null", "0"], "sha1", "05fe405753166f125559e7c9ac558654f107c7e9"),
        // Sparse, with data that starts and ends inside blocks.
        (sparseData, "sha256", "fe1ea84ff4b6d2123243371c2737b1897505f4e9e07a2faad0ed5e0bc71e008f"),
        (
            sparseData, "sha512/4k",
            "190fca22a151a5fb3e309cd8d7c7cf783bfe82fcdab371a6a0d4fd435b27ad5c"
                + "504960564a4eb9a8bb7971003bd91945d35078ef161540251d3b6bdaf918bace"
        ),
        // A terabyte with three bytes of data: hashed from block status, not read.
        (
            ["data", "data=@0 1 @549755813888 2 @1099511627775 3", "size=1T"], "sha256",
            "df59d4901c88f9547fcd57b24f99ded65356d57af60017b953bac1c12aa22176"
        ),
    ]

    static let sparseData = ["data", "data=@65536 1 2 3 4 @1048579 5 @2000000 ( 0x55 0xaa )*35000", "size=8M"]
    static let sparseDigest = knownAnswers[9].digest

    @Test(arguments: 0..<knownAnswers.count)
    func checksumPrintsWhatNbdcopy124Prints(index: Int) async throws {
        let (plugin, blkhash, digest) = Self.knownAnswers[index]
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(plugin).description
        let result = try runNBD(["checksum", "--blkhash=\(blkhash)", uri])
        #expect(result.status == 0, "\(result.error)")
        #expect(result.output == "\(digest)  \(uri)\n")
    }

    /// The same image as a file, from nbdkit's file plugin, qemu-nbd and the built-in server:
    /// one digest, by `nbd checksum` and by `nbd copy --blkhash` into each kind of destination.
    @Test func everySourceAndCopyAgree() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let image = server.path("image.raw")
        // The sparse known answer's bytes, written by nbdcopy from nbdkit's data plugin.
        let data = try await server.nbdkit(Self.sparseData).description
        _ = try server.run("nbdcopy", [data, image])
        let fromFile = try await server.nbdkit(["file", image]).description
        let qemuSocket = server.path("qemu.sock")
        try await server.start("qemu-nbd", ["-k", qemuSocket, "-t", "-f", "raw", "-r", image], waitFor: qemuSocket)
        let ours = try await NBDServer.start(
            exports: [NBDServerExport(backend: try FileBackend(path: image, readOnly: true))],
            on: .unix(path: server.path("ours.sock"))
        )
        defer { Task { await ours.shutdown() } }
        let sources = [image, data, fromFile, NBDURI(socket: qemuSocket).description, NBDURI(socket: server.path("ours.sock")).description]
        let result = try runNBD(["checksum"] + sources)
        #expect(result.status == 0, "\(result.error)")
        #expect(result.output == sources.map { "\(Self.sparseDigest)  \($0)\n" }.joined())

        let memory = try await server.nbdkit(["memory", "8M"]).description
        for (source, destination) in [(data, "null:"), (image, memory), (memory, server.path("copy.raw")), (data, "-")] {
            let copy = try runNBD(["copy", "--blkhash", source, destination])
            #expect(copy.status == 0, "\(copy.error)")
            // To stdout the data comes first, then the digest's line.
            #expect(copy.output.hasSuffix("\(Self.sparseDigest)\n"), "\(source) -> \(destination)")
        }
        #expect(try sameContents(image, server.path("copy.raw")))
        // --blkhash-file: the line goes there, and nothing to stdout.
        let file = server.path("digest.txt")
        let copy = try runNBD(["copy", "--blkhash=sha256", "--blkhash-file", file, data, "null:"])
        #expect(copy.status == 0 && copy.output.isEmpty)
        #expect(try String(contentsOfFile: file, encoding: .utf8) == "\(Self.sparseDigest)\n")
    }

    @Test func verifyPassesOnAGoodCopy() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let source = try await server.nbdkit(Self.sparseData).description
        let destination = try await server.nbdkit(["memory", "8M"]).description
        let result = try runNBD(["copy", "--verify", "--blkhash=md5/4k", source, destination])
        #expect(result.status == 0, "\(result.error)")
        #expect(result.error.contains("verified") && result.error.contains("md5/4K"))
        #expect(result.output.split(separator: "\n").count == 1)
        // To a file too, read back from the file.
        let file = try runNBD(["copy", "--verify", source, server.path("copy.raw")])
        #expect(file.status == 0 && file.error.contains("verified"), "\(file.error)")
    }

    /// nbdkit's null plugin takes every write and reads back zeroes: the copy "succeeds" and
    /// only --verify notices, naming the first block with data (65536, block 1 of 64K).
    @Test func verifyFindsTheFirstBlockThatDiffers() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let source = try await server.nbdkit(Self.sparseData).description
        let liar = try await server.nbdkit(["null", "8M"]).description
        let result = try runNBD(["copy", "--verify", source, liar])
        #expect(result.status == 1)
        #expect(
            result.error
                == "nbd: verify failed: the destination differs from the source first in block 1 of 64K, bytes 65536..<131072\n"
        )
        // Data past the first region of 16 MiB: found by the region digests.
        let late = try await server.nbdkit(["data", "data=@20000000 7", "size=24M"]).description
        let bigLiar = try await server.nbdkit(["null", "24M"]).description
        let second = try runNBD(["copy", "--verify", "--blkhash=sha1/1M", late, bigLiar])
        #expect(second.status == 1)
        #expect(second.error.contains("first in block 19 of 1M, bytes 19922944..<20971520"), "\(second.error)")
        // Without --verify the same copy succeeds: that is what --verify is for.
        #expect(try runNBD(["copy", source, liar]).status == 0)
    }

    @Test(arguments: [
        ["checksum", "--blkhash=blake2", "pattern:1M"],  // unknown digest
        ["checksum", "--blkhash=sha256/1000", "pattern:1M"],  // not a power of two
        ["checksum", "--blkhash=sha256/0", "pattern:1M"],
        ["checksum"],  // no source
        ["copy", "--blkhash-file", "/tmp/x", "pattern:1M", "null:"],  // --blkhash-file alone
        ["copy", "--verify", "pattern:1M", "null:"],  // nothing to read back
        ["copy", "--blkhash=md5/1Q", "pattern:1M", "null:"],
    ])
    func badCommandLinesGiveOneLineAndExitOne(arguments: [String]) throws {
        let result = try runNBD(arguments)
        #expect(result.status == 1)
        #expect(result.error.hasPrefix("nbd: "))
        #expect(result.error.split(separator: "\n").count == 1, "\(result.error)")
    }
}
