import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// `null:`: discards everything; what a checksum copies to.
public struct NullDestination: CopyDestination {
    public init() {}
    public var discards: Bool { true }
    public var size: UInt64? { nil }
    public var startsZeroed: Bool { true }
    public var isSequential: Bool { false }
    public func write(_ data: [ByteBuffer], at offset: UInt64, worker: Int) async throws {}
    public func zero(at offset: UInt64, length: UInt64, worker: Int) async throws {}
    public func flush() async throws {}
    public func close() async {}
}

/// Data made up as it is read: `pattern:SIZE` (every 8-byte word holds its own offset,
/// big-endian, like nbdkit's pattern plugin) and `zero:SIZE` (all zeroes, known as such).
public struct SyntheticSource: CopySource {
    public let size: UInt64?
    /// True for ``zero(size:)``.
    public let isZero: Bool

    package init(size: UInt64?, isZero: Bool) {
        self.size = size
        self.isZero = isZero
    }

    /// What it reads never changes: the same for every run.
    public var stateIdentity: String? { isZero ? "zero" : "pattern" }

    public func zeroRanges(from offset: UInt64, length: UInt64) async throws -> [Range<UInt64>] {
        isZero ? [offset..<(offset + length)] : []
    }

    public func read(into buffer: inout ByteBuffer, at offset: UInt64, length: Int, worker: Int) async throws {
        guard !isZero else {
            buffer.writeRepeatingByte(0, count: length)
            return
        }
        // Whole words from the one holding `offset`, trimmed to the bytes asked for. Stored
        // straight into the buffer: this runs for every piece, and must not hog a thread.
        let first = offset / 8 * 8
        let skip = Int(offset - first)
        let words = (skip + length + 7) / 8
        buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: words * 8) { raw in
            for index in 0..<words {
                raw.storeBytes(of: (first + UInt64(index) * 8).bigEndian, toByteOffset: index * 8, as: UInt64.self)
            }
            // Move the wanted bytes to the front: the buffer's next write starts after them.
            if skip > 0 { memmove(raw.baseAddress!, raw.baseAddress! + skip, length) }
            return length
        }
    }
}

extension CopySource where Self == SyntheticSource {
    /// `size` bytes in which every 8-byte word holds its own offset, big-endian (`pattern:SIZE`).
    public static func pattern(size: UInt64) -> SyntheticSource { SyntheticSource(size: size, isZero: false) }

    /// `size` bytes of zeroes, known as such: nothing is read or written for them (`zero:SIZE`).
    public static func zero(size: UInt64) -> SyntheticSource { SyntheticSource(size: size, isZero: true) }
}

extension CopyDestination where Self == NullDestination {
    /// Discards everything (`null:`).
    public static var null: NullDestination { NullDestination() }
}
