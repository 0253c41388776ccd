/// An export's size constraints ("Size constraints", `NBD_INFO_BLOCK_SIZE`).
public struct BlockSizeConstraints: Hashable, Sendable {
    /// Smallest addressable length and alignment: a power of 2, at most 64 KiB.
    public var minimum: UInt32
    /// The size at which aligned I/O is efficient.
    public var preferred: UInt32
    /// Largest payload the server accepts in one request.
    public var maximum: UInt32

    /// Constraints with the given sizes.
    public init(minimum: UInt32, preferred: UInt32, maximum: UInt32) {
        self.minimum = minimum
        self.preferred = preferred
        self.maximum = maximum
    }

    /// What the spec says to assume when the server advertises nothing: minimum 1,
    /// preferred 4 KiB, maximum payload 32 MiB.
    public static let `default` = BlockSizeConstraints(minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024)

    /// Checks the MUSTs of "Size constraints" on advertised values.
    public func validate() throws(NBDError) {
        guard minimum > 0, minimum.nonzeroBitCount == 1, minimum <= 65536 else {
            throw .serverViolation("minimum block size \(minimum) MUST be a power of 2 no larger than 65536")
        }
        guard preferred.nonzeroBitCount == 1, preferred >= max(minimum, 512) else {
            throw .serverViolation("preferred block size \(preferred) MUST be a power of 2 of at least max(minimum, 512)")
        }
        guard maximum >= preferred else {
            throw .serverViolation("maximum payload \(maximum) MUST be at least the preferred block size \(preferred)")
        }
    }
}
