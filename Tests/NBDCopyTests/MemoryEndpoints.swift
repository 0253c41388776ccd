import Foundation
import NBDCopy
import NIOConcurrencyHelpers
import NIOCore
import TestSupport

/// An image in memory, read as a copy source: `zeroes` are reported as known zero ranges (as
/// block status or SEEK_HOLE would), and a read at `failingAt` fails.
final class MemorySource: CopySource {
    let bytes: [UInt8]
    let zeroes: [Range<UInt64>]
    let failingAt: UInt64?
    private let readCount = NIOLockedValueBox(0)

    init(_ bytes: [UInt8], zeroes: [Range<UInt64>] = [], failingAt: UInt64? = nil) {
        self.bytes = bytes
        self.zeroes = zeroes
        self.failingAt = failingAt
    }

    var size: UInt64? { UInt64(bytes.count) }
    var readsOffThread: Bool { false }
    var reads: Int { readCount.withLockedValue { $0 } }

    func zeroRanges(from offset: UInt64, length: UInt64) async throws -> [Range<UInt64>] {
        zeroes.map { $0.clamped(to: offset..<offset + length) }.filter { !$0.isEmpty }
    }

    func read(into buffer: inout ByteBuffer, at offset: UInt64, length: Int, worker: Int) async throws {
        readCount.withLockedValue { $0 += 1 }
        if let failingAt, (offset..<offset + UInt64(length)).contains(failingAt) {
            throw NBDCopyError(.fileFailed, "injected read failure at \(offset)")
        }
        // A task switch here, so that workers interleave as they do over real I/O, and a
        // cancelled task's read is abandoned, as an export's requests are.
        await Task.yield()
        try Task.checkCancellation()
        let end = min(bytes.count, Int(offset) + length)
        buffer.writeBytes(bytes[Int(offset)..<end])
    }
}

/// A destination in memory, of a fixed size, that starts as `initial` (zeroes unless said),
/// and can fail a write at `failingAt`, ask a stop after `stopAfter` writes, or cancel the
/// task of write number `cancelAt` (the copy then fails with the writes in flight abandoned).
final class MemoryDestination: CopyDestination {
    private let storage: NIOLockedValueBox<[UInt8]>
    let startsZeroed: Bool
    let failingAt: UInt64?
    let stopAfter: (writes: Int, stop: CopyStop)?
    let cancelAt: Int?
    private let counts = NIOLockedValueBox((writes: 0, zeroes: 0, flushes: 0))

    init(size: Int, initial: UInt8 = 0, failingAt: UInt64? = nil, stopAfter: (writes: Int, stop: CopyStop)? = nil, cancelAt: Int? = nil) {
        storage = NIOLockedValueBox([UInt8](repeating: initial, count: size))
        startsZeroed = initial == 0
        self.failingAt = failingAt
        self.stopAfter = stopAfter
        self.cancelAt = cancelAt
    }

    var size: UInt64? { UInt64(storage.withLockedValue { $0.count }) }
    var isSequential: Bool { false }
    var bytes: [UInt8] { storage.withLockedValue { $0 } }
    var writes: Int { counts.withLockedValue { $0.writes } }
    var flushes: Int { counts.withLockedValue { $0.flushes } }

    func write(_ data: [ByteBuffer], at offset: UInt64, worker: Int) async throws {
        let length = data.reduce(0) { $0 + $1.readableBytes }
        if let failingAt, (offset..<offset + UInt64(length)).contains(failingAt) {
            throw NBDCopyError(.fileFailed, "injected write failure at \(offset)")
        }
        let writes = counts.withLockedValue {
            $0.writes += 1
            return $0.writes
        }
        if writes == cancelAt { withUnsafeCurrentTask { $0?.cancel() } }
        await Task.yield()
        try Task.checkCancellation()
        storage.withLockedValue { storage in
            var position = Int(offset)
            for buffer in data {
                storage.replaceSubrange(position..<position + buffer.readableBytes, with: buffer.readableBytesView)
                position += buffer.readableBytes
            }
        }
        if let stopAfter, writes >= stopAfter.writes { stopAfter.stop.request() }
    }

    func zero(at offset: UInt64, length: UInt64, worker: Int) async throws {
        counts.withLockedValue { $0.zeroes += 1 }
        storage.withLockedValue { $0.replaceSubrange(Int(offset)..<Int(offset + length), with: repeatElement(0, count: Int(length))) }
    }

    func flush() async throws {
        counts.withLockedValue { $0.flushes += 1 }
    }

    func close() async {}
}

/// Bytes that are not zero anywhere, different at every offset of a 251-byte cycle.
func image(_ count: Int, seed: UInt8 = 1) -> [UInt8] {
    repeatedCycle((0..<251).map { UInt8(($0 + Int(seed)) % 251 + 1) }, count: count)
}

/// Where two images first differ (or where the shorter ends), nil when they are the same: a
/// failed comparison of megabytes says where, not every byte.
func firstDifference<A: Collection<UInt8>, B: Collection<UInt8>>(_ first: A, _ second: B) -> Int? {
    let (left, right) = (Array(first), Array(second))
    let common = min(left.count, right.count)
    // A block at a time with memcmp, then byte by byte in the block that differs: a debug
    // build (and more so TSan) is slow per byte.
    let differing = left.withUnsafeBytes { one in
        right.withUnsafeBytes { other -> Int? in
            for start in stride(from: 0, to: common, by: 4096) {
                let length = min(4096, common - start)
                if memcmp(one.baseAddress! + start, other.baseAddress! + start, length) != 0 {
                    return (start..<start + length).first { one[$0] != other[$0] }
                }
            }
            return nil
        }
    }
    return differing ?? (left.count == right.count ? nil : common)
}
