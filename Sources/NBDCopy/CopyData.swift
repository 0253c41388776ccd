import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The bytes of one read, in the buffers they arrived in (slices of an NBD connection's
/// receive buffers, or one buffer of a file): they are passed on as they are, never gathered.
package struct CopyData {
    package let buffers: [ByteBuffer]
    /// Where each buffer starts, from the first byte of the read (none for one buffer).
    private let starts: [Int]
    package let count: Int

    package init(_ buffers: [ByteBuffer]) {
        self.buffers = buffers
        // None for one buffer (nearly every piece), which then costs no allocation.
        var starts: [Int] = []
        var count = 0
        for buffer in buffers {
            if buffers.count > 1 { starts.append(count) }
            count += buffer.readableBytes
        }
        self.starts = starts
        self.count = count
    }

    /// Slices covering `range` (offsets from the first byte of the read).
    package func slices(_ range: Range<Int>) -> [ByteBuffer] {
        var slices: [ByteBuffer] = []
        forEachPart(of: range) { buffer, local in
            slices.append(buffer.getSlice(at: buffer.readerIndex + local.lowerBound, length: local.count)!)
            return true
        }
        return slices
    }

    /// Calls `body` with the bytes of `range`, a contiguous part at a time, in order.
    package func withBytes(of range: Range<Int>, _ body: (UnsafeRawBufferPointer) -> Void) {
        forEachPart(of: range) { buffer, local in
            buffer.withUnsafeReadableBytes { body(UnsafeRawBufferPointer(rebasing: $0[local])) }
            return true
        }
    }

    /// Whether every byte in `range` is zero.
    package func isZero(_ range: Range<Int>) -> Bool {
        var zero = true
        forEachPart(of: range) { buffer, local in
            zero = buffer.withUnsafeReadableBytes { Self.isZero(UnsafeRawBufferPointer(rebasing: $0[local])) }
            return zero
        }
        return zero
    }

    /// Calls `body` with each buffer that `range` touches and the range within it, in order,
    /// while it returns true.
    private func forEachPart(of range: Range<Int>, _ body: (ByteBuffer, Range<Int>) -> Bool) {
        for (index, buffer) in buffers.enumerated() {
            let start = index == 0 ? 0 : starts[index]
            let end = start + buffer.readableBytes
            guard end > range.lowerBound else { continue }
            guard start < range.upperBound else { return }
            let local = (max(range.lowerBound, start) - start)..<(min(range.upperBound, end) - start)
            guard body(buffer, local) else { return }
        }
    }

    /// A page of zeroes to compare against with memcmp, which is fast in any build.
    private static let zeroPage = [UInt8](repeating: 0, count: 65536)

    package static func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        var position = 0
        while position < bytes.count {
            let count = min(bytes.count - position, zeroPage.count)
            let same = zeroPage.withUnsafeBytes { memcmp(bytes.baseAddress! + position, $0.baseAddress!, count) == 0 }
            guard same else { return false }
            position += count
        }
        return true
    }
}
