import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

extension LocalFile {
    /// How a range was made to read as zeroes.
    package enum Zeroing: Sendable, Equatable {
        /// A hole punched in a regular file: its blocks are freed.
        case punched
        /// `FALLOC_FL_ZERO_RANGE` on a file, or `BLKZEROOUT` on a block device: allocated,
        /// zero, with no data sent through the page cache.
        case zeroRange
        /// Zero bytes written, where neither call worked (or on a stream).
        case written
    }

    /// Makes `range` read as zeroes, the cheapest way there is: a punched hole when `mayPunch`
    /// (the file stays sparse), else the file system's or device's zeroing, else zero bytes
    /// written in pieces of at most 1 MiB.
    @discardableResult
    package func zero(_ range: Range<UInt64>, mayPunch: Bool) async throws -> Zeroing {
        guard !range.isEmpty else { return .written }
        if mayPunch, try await punchHole(range) { return .punched }
        if try await zeroRange(range) { return .zeroRange }
        let block = ByteBuffer(repeating: 0, count: Int(min(UInt64(range.count), 1 << 20)))
        var position = range.lowerBound
        while position < range.upperBound {
            let count = Int(min(UInt64(block.readableBytes), range.upperBound - position))
            try await write([block.getSlice(at: 0, length: count)!], at: position)
            position += UInt64(count)
        }
        return .written
    }

    /// Frees the blocks of `range`: a punched hole in a regular file (which then reads as
    /// zeroes), `BLKDISCARD` on a block device (after which the device decides what it reads).
    /// False where the system cannot; a trim is a hint, so that is no error.
    package func discard(_ range: Range<UInt64>) async throws -> Bool {
        switch kind {
        case .regular: return try await punchHole(range)
        case .blockDevice: return try await blockDeviceCall(BlockDeviceCall.discard, range)
        case .stream: return false
        }
    }

    /// `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE` on a regular file.
    package func punchHole(_ range: Range<UInt64>) async throws -> Bool {
        guard kind == .regular else { return false }
        return try await fallocate(mode: 0x02 | 0x01, range)
    }

    /// `FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE` on a regular file, `BLKZEROOUT` on a block device.
    package func zeroRange(_ range: Range<UInt64>) async throws -> Bool {
        switch kind {
        case .regular: return try await fallocate(mode: 0x10 | 0x01, range)
        case .blockDevice: return try await blockDeviceCall(BlockDeviceCall.zeroOut, range)
        case .stream: return false
        }
    }

    private func fallocate(mode: Int32, _ range: Range<UInt64>) async throws -> Bool {
        #if os(Linux)
        guard let offset = Int64(exactly: range.lowerBound), let length = Int64(exactly: range.count) else { return false }
        let fd = descriptor
        return try await blocking { linuxFallocate(fd, mode, offset, length) == 0 }
        #else
        return false
        #endif
    }

    /// The block device ioctls that take a `{start, length}` pair.
    private enum BlockDeviceCall {
        /// `_IO(0x12, 119)`
        static let discard: UInt = 0x1277
        /// `_IO(0x12, 127)`
        static let zeroOut: UInt = 0x127F
    }

    private func blockDeviceCall(_ request: UInt, _ range: Range<UInt64>) async throws -> Bool {
        #if os(Linux)
        let fd = descriptor
        let pair = [range.lowerBound, UInt64(range.count)]
        return try await blocking {
            var pair = pair
            return pair.withUnsafeMutableBufferPointer { ioctl(fd, request, $0.baseAddress!) } == 0
        }
        #else
        return false
        #endif
    }
}

#if os(Linux)
/// glibc's `fallocate(2)`, which Swift's Glibc module does not import (it needs _GNU_SOURCE).
@_silgen_name("fallocate")
private func linuxFallocate(_ fd: Int32, _ mode: Int32, _ offset: Int64, _ length: Int64) -> Int32
#endif
