import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// `null:`: discards everything.
package struct NullDestination: CopyDestination {
    package init() {}
    package var discards: Bool { true }
    package var size: UInt64? { nil }
    package var startsZeroed: Bool { true }
    package var isSequential: Bool { false }
    package func write(_ data: [ByteBuffer], at offset: UInt64, worker: Int) async throws {}
    package func zero(at offset: UInt64, length: UInt64, worker: Int) async throws {}
    package func flush() async throws {}
    package func close() async {}
}

/// `pattern:SIZE` (every 8-byte word holds its own offset, big-endian, like nbdkit's pattern
/// plugin) and `zero:SIZE` (all zeroes, known as such).
package struct SyntheticSource: CopySource {
    package let size: UInt64?
    package let isZero: Bool

    package init(size: UInt64?, isZero: Bool) {
        self.size = size
        self.isZero = isZero
    }

    package func zeroRanges(from offset: UInt64, length: UInt64) async throws -> [Range<UInt64>] {
        isZero ? [offset..<(offset + length)] : []
    }

    package func read(into buffer: inout ByteBuffer, at offset: UInt64, length: Int, worker: Int) async throws {
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
