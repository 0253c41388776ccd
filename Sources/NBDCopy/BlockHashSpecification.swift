import Crypto
import Foundation
import NBD

/// Which blkhash: nbdcopy 1.24's `--blkhash=ALGORITHM/BLOCKSIZE`; see <doc:BlockHashFormat>
/// for how one is computed.
///
/// The blkhash of an image is the digest of the digests of its blocks, in order, followed by
/// the image's size as a little-endian 64-bit number. Every block is ``blockSize`` bytes but
/// the last, which is what is left. Its worth is that blocks can be hashed in any order, on any
/// thread, and that a block of zeroes costs nothing: its digest is always the same.
public struct BlockHashSpecification: Sendable, Hashable, CustomStringConvertible {
    /// The digest of blocks, and of the block digests.
    public enum Algorithm: String, CaseIterable, Sendable {
        case md5, sha1, sha256, sha512
    }

    /// The digest.
    public private(set) var algorithm: Algorithm = .sha256
    /// Bytes per block: a power of two from 1 to 1 GiB.
    public private(set) var blockSize = 64 << 10

    /// `sha256/64K`, nbdcopy's default.
    public static let `default` = BlockHashSpecification()

    /// `algorithm` over blocks of `blockSize` bytes; throws ``NBDCopyError/Code/invalidArgument``
    /// unless `blockSize` is a power of two from 1 to 1 GiB.
    public init(_ algorithm: Algorithm, blockSize: Int = 64 << 10) throws {
        guard blockSize > 0, blockSize & (blockSize - 1) == 0, blockSize <= 1 << 30 else {
            throw NBDCopyError(.invalidArgument, "the blkhash block size must be a power of two from 1 to 1G, not \(blockSize)")
        }
        self.algorithm = algorithm
        self.blockSize = blockSize
    }

    /// `ALGORITHM` or `ALGORITHM/BLOCKSIZE` (a power of two, with K, M or G), as nbdcopy takes it.
    public init(parsing text: String) throws {
        let parts = text.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
        guard let algorithm = Algorithm(rawValue: parts[0].lowercased()) else {
            let names = Algorithm.allCases.map(\.rawValue).joined(separator: ", ")
            throw NBDCopyError(.invalidArgument, "unknown blkhash digest \"\(parts[0])\" (expected \(names), optionally /BLOCKSIZE)")
        }
        self.algorithm = algorithm
        if parts.count == 2 {
            guard case .success(let size) = ByteCount.parse(String(parts[1])), size > 0, size & (size - 1) == 0, size <= 1 << 30 else {
                throw NBDCopyError(.invalidArgument, "the blkhash block size must be a power of two from 1 to 1G, not \(parts[1])")
            }
            blockSize = Int(size)
        }
    }

    private init() {}

    /// `sha256/64K`.
    public var description: String { "\(algorithm.rawValue)/\(ByteCount.exactText(UInt64(blockSize)))" }

    /// The digest of `bytes` with this algorithm.
    package func digest(_ bytes: UnsafeRawBufferPointer) -> [UInt8] {
        var hasher = IncrementalHash(algorithm)
        hasher.update(bytes)
        return hasher.finalize()
    }
}

/// One of swift-crypto's hash functions, chosen at run time.
package struct IncrementalHash {
    private var function: any HashFunction

    package init(_ algorithm: BlockHashSpecification.Algorithm) {
        switch algorithm {
        case .md5: function = Insecure.MD5()
        case .sha1: function = Insecure.SHA1()
        case .sha256: function = SHA256()
        case .sha512: function = SHA512()
        }
    }

    package mutating func update(_ bytes: UnsafeRawBufferPointer) { function.update(bufferPointer: bytes) }

    package mutating func update(_ bytes: [UInt8]) { bytes.withUnsafeBytes { update($0) } }

    package func finalize() -> [UInt8] { function.finalize().withUnsafeBytes { Array($0) } }
}

extension Array where Element == UInt8 {
    /// Lower-case hexadecimal, as nbdcopy and sha256sum print digests.
    package var hex: String {
        let digits = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(count * 2)
        for byte in self {
            out.append(digits[Int(byte >> 4)])
            out.append(digits[Int(byte & 15)])
        }
        return String(decoding: out, as: UTF8.self)
    }
}
