/// The blkhash of an image: what ``checksum(of:specification:options:progress:stop:)`` returns,
/// and a copy's ``CopyReport/blockHash``.
public struct BlockHash: Sendable, Equatable, CustomStringConvertible {
    /// How it was computed.
    public let specification: BlockHashSpecification
    /// The image's size in bytes.
    public let size: UInt64
    /// The digest.
    public let digest: [UInt8]
    /// The digests of each 16 MiB region's block digests, so that two images with different
    /// blkhashes can be told apart region by region (2 to 4 MiB of them per TiB).
    package let regions: [[UInt8]]

    package init(specification: BlockHashSpecification, size: UInt64, digest: [UInt8], regions: [[UInt8]]) {
        self.specification = specification
        self.size = size
        self.digest = digest
        self.regions = regions
    }

    /// The digest in lower-case hexadecimal, as nbdcopy and sha256sum print it.
    public var hex: String { digest.hex }

    /// ``hex``.
    public var description: String { hex }

    /// Two blkhashes are the same when their digests are.
    public static func == (lhs: BlockHash, rhs: BlockHash) -> Bool {
        lhs.specification == rhs.specification && lhs.size == rhs.size && lhs.digest == rhs.digest
    }

    /// The first region (of `regionSize` bytes) whose blocks differ from those of `other`, a
    /// blkhash of the same specification; nil when there is none.
    package func firstDifferentRegion(from other: BlockHash) -> Int? {
        if let index = zip(regions, other.regions).enumerated().first(where: { $0.element.0 != $0.element.1 })?.offset {
            return index
        }
        return regions.count == other.regions.count ? nil : min(regions.count, other.regions.count)
    }
}
