import NBDCore
import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A file or block device: reads and writes with pread/pwrite on NIO's thread pool, FLUSH as
/// fsync, holes found with SEEK_DATA/SEEK_HOLE.
public final class FileBackend: NBDServerBackend {
    public let size: UInt64
    public let isReadOnly: Bool
    public var flushCoversAllConnections: Bool { true }
    /// Zeroes are written as data here, so a fast zero is refused.
    public var zeroIsFast: Bool { false }
    private let descriptor: Int32

    /// Opens `path` (for reading only with `readOnly`).
    public init(path: String, readOnly: Bool = false) throws {
        let fd = open(path, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
        guard fd >= 0 else { throw NBDServerError(.EIO, "cannot open \(path): \(String(cString: strerror(errno)))") }
        let end = lseek(fd, 0, SEEK_END)
        guard end >= 0 else {
            close(fd)
            throw NBDServerError(.EIO, "cannot size \(path)")
        }
        descriptor = fd
        size = UInt64(end)
        isReadOnly = readOnly
    }

    deinit { close(descriptor) }

    private func blocking<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await NIOThreadPool.singleton.runIfActive(body)
    }

    public func read(at offset: UInt64, length: Int) async throws -> ByteBuffer {
        let fd = descriptor
        return try await blocking {
            var buffer = ByteBuffer()
            try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { pointer in
                let room = UnsafeMutableRawBufferPointer(rebasing: pointer.prefix(length))
                guard case .success(length) = FileIO.read(fd, into: room, at: offset) else {
                    throw NBDServerError(.EIO, "read failed at \(offset)")
                }
                return length
            }
            return buffer
        }
    }

    public func write(_ data: ByteBuffer, at offset: UInt64, fua: Bool) async throws {
        let fd = descriptor
        try await blocking {
            try data.withUnsafeReadableBytes { pointer in
                if case .failure(let error) = FileIO.write(fd, pointer, at: offset) {
                    throw NBDServerError(error.code == ENOSPC ? .ENOSPC : .EIO, "write failed at \(offset): \(error)")
                }
            }
            if fua { fsync(fd) }
        }
    }

    public func flush() async throws {
        let fd = descriptor
        try await blocking {
            guard fsync(fd) == 0 else { throw NBDServerError(.EIO, "fsync failed") }
        }
    }

    /// Punches a hole where the system can; otherwise a hint with no effect.
    public func trim(at offset: UInt64, length: UInt64) async throws {
        _ = try await punchHole(at: offset, length: length)
    }

    public func zero(at offset: UInt64, length: UInt64, noHole: Bool) async throws {
        if !noHole, try await punchHole(at: offset, length: length) { return }
        let block = ByteBuffer(repeating: 0, count: Int(min(length, 1 << 20)))
        var position = offset
        while position < offset + length {
            let count = Int(min(UInt64(block.readableBytes), offset + length - position))
            try await write(block.getSlice(at: 0, length: count)!, at: position, fua: false)
            position += UInt64(count)
        }
    }

    /// FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE: the range reads as zeroes and frees its blocks.
    private func punchHole(at offset: UInt64, length: UInt64) async throws -> Bool {
        #if os(Linux)
        let fd = descriptor
        return try await blocking { linuxFallocate(fd, 0x02 | 0x01, Int64(offset), Int64(length)) == 0 }
        #else
        return false
        #endif
    }

    public func extents(at offset: UInt64, length: UInt64) async throws -> [BlockDescriptor] {
        let fd = descriptor
        // The whole range (a 64-bit request may ask for a terabyte in one go), in at most
        // `BlockDescriptor.mostInOneAnswer` extents: the client asks again from where the answer ends.
        let end = min(size, offset + length)
        return try await blocking {
            #if os(Linux)
            let seekData: Int32 = 3
            let seekHole: Int32 = 4
            #else
            let seekData = SEEK_DATA
            let seekHole = SEEK_HOLE
            #endif
            var result: [BlockDescriptor] = []
            var position = offset
            while position < end, result.count < BlockDescriptor.mostInOneAnswer {
                let data = lseek(fd, off_t(position), seekData)
                // No data from here on (ENXIO): the rest is a hole.
                let dataStart = data < 0 ? end : min(end, UInt64(data))
                if dataStart > position {
                    result.append(BlockDescriptor(length: dataStart - position, flags: 3))
                    position += result.last!.length
                    continue
                }
                let hole = lseek(fd, off_t(position), seekHole)
                let holeStart = hole < 0 ? end : min(end, UInt64(hole))
                result.append(BlockDescriptor(length: max(holeStart, position + 1) - position, flags: 0))
                position += result.last!.length
            }
            return result
        }
    }
}

#if os(Linux)
/// glibc's `fallocate(2)`, which Swift's Glibc module does not import (it needs _GNU_SOURCE).
@_silgen_name("fallocate")
private func linuxFallocate(_ fd: Int32, _ mode: Int32, _ offset: Int64, _ length: Int64) -> Int32
#endif
