import NBDCopy
import NIOCore
import Testing

/// blkhash from the engine alone, against what nbdcopy 1.24 printed for nbdkit's pattern
/// plugin (the same answers the interop suite checks through servers): the pattern source
/// makes the same bytes.
@Suite("blkhash")
struct BlockHashTests {
    static let knownAnswers: [(size: UInt64, blkhash: String, digest: String)] = [
        (1 << 20, "sha256", "516b9cc336368a4302005a1ba67c14e5eeb57f4888492a1920aaa7d0878c0272"),
        (1 << 20, "md5/512", "92f1f4d440db39a2ac6c3ccdca9b017f"),
        (1 << 20, "sha1/4k", "2598cd6e5d0105440feb02bc7b250d81434e3fcf"),
        (200_001, "sha256", "5551258cabc9eaf6a7f941c488cf225db69aa888e7c8604a727bb247e9346239"),
        (200_001, "sha256/4k", "45241c4903f40b3d429451095da2ef32a6512f870a948b8fe0ab2aff537863b9"),
        (200_001, "md5/1M", "35d77538bba2ce92fbc6c726684450e9"),
        (0, "sha256", "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"),
        (0, "sha1", "05fe405753166f125559e7c9ac558654f107c7e9"),
    ]

    @Test(arguments: 0..<knownAnswers.count)
    func patternMatchesNbdcopy(index: Int) async throws {
        let answer = Self.knownAnswers[index]
        let specification = try BlockHashSpecification(parsing: answer.blkhash)
        // Requests that cut blocks, and ones larger than them.
        for requestSize: UInt64 in [1000, 64 << 10] {
            var options = CopyOptions()
            options.requestSize = requestSize
            options.requests = 4
            let hash = try #require(await checksum(of: .pattern(size: answer.size), specification: specification, options: options))
            #expect(hash.size == answer.size)
            #expect(hash.hex == answer.digest, "\(answer.blkhash) of \(answer.size) bytes")
        }
    }

    /// Zeroes known as such (filed as runs, never read) hash as zeroes read as data do.
    @Test func knownZeroesHashAsReadZeroes() async throws {
        let specification = try BlockHashSpecification(parsing: "sha256/4k")
        let size = UInt64(3 << 20) + 1234
        var options = CopyOptions()
        options.requestSize = 1 << 20
        options.requests = 2
        let known = try await checksum(of: .zero(size: size), specification: specification, options: options)
        let read = try await checksum(
            of: MemorySource([UInt8](repeating: 0, count: Int(size))),
            specification: specification,
            options: options
        )
        #expect(known != nil && known == read)
    }

    /// The format as BlockHashFormat.md writes it down, computed the plain way, is what the
    /// engine computes: block digests in order, the last block at its own length, zero blocks
    /// hashed like any other, then the size as 8 little-endian bytes.
    @Test(arguments: ["sha256/4K", "md5/512", "sha1/64K", "sha512/1K"])
    func theDocumentedFormatIsWhatTheEngineComputes(text: String) async throws {
        let specification = try BlockHashSpecification(parsing: text)
        var bytes = image(300_007, seed: 9)
        for index in 8192..<(8192 + 20000) { bytes[index] = 0 }
        var outer = IncrementalHash(specification.algorithm)
        for start in stride(from: 0, to: bytes.count, by: specification.blockSize) {
            outer.update(bytes[start..<min(bytes.count, start + specification.blockSize)].withUnsafeBytes { specification.digest($0) })
        }
        withUnsafeBytes(of: UInt64(bytes.count).littleEndian) { outer.update($0) }
        let engine = try await checksum(
            of: MemorySource(bytes, zeroes: [8192..<(8192 + 20000)]),
            specification: specification,
            options: {
                var options = CopyOptions()
                options.requestSize = 5000
                return options
            }()
        )
        #expect(engine?.digest == outer.finalize())
    }

    /// A checksum stopped before its end has no result, rather than a wrong one.
    @Test func aStoppedChecksumHasNoResult() async throws {
        let stop = CopyStop()
        stop.request()
        #expect(try await checksum(of: .pattern(size: UInt64(1 << 20)), stop: stop) == nil)
    }

    @Test func aHashMissingBytesIsRefused() throws {
        let hasher = BlockHasher(try BlockHashSpecification(parsing: "sha256/4k"))
        hasher.addZeroes(at: 0, length: 8192)
        #expect { try hasher.finish(size: 16384) } throws: { ($0 as? NBDCopyError)?.code == .incomplete }
    }

    @Test func specificationsParseAndRefuse() throws {
        #expect("\(try BlockHashSpecification(parsing: "SHA256/64k"))" == "sha256/64K")
        for bad in ["sha3", "sha256/3000", "sha256/0", "sha256/2G", "sha256/x"] {
            #expect(throws: NBDCopyError.self, "\(bad)") { try BlockHashSpecification(parsing: bad) }
        }
        #expect(try BlockHashSpecification(.sha512, blockSize: 1 << 20) == (try BlockHashSpecification(parsing: "sha512/1M")))
        for bad in [0, 3000, 2 << 30] {
            #expect(throws: NBDCopyError.self, "\(bad)") { try BlockHashSpecification(.sha256, blockSize: bad) }
        }
    }
}
