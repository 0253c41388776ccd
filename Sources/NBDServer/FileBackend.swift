@_spi(NBDMachines) import NBDCore
import NBDSystem
import NIOConcurrencyHelpers
import NIOCore

/// A file or block device: reads and writes with pread/pwrite on NIO's thread pool, FLUSH as
/// fsync, holes found with SEEK_DATA/SEEK_HOLE, trims and zeroes as punched holes (or, on a
/// block device, `BLKDISCARD` and `BLKZEROOUT`). A regular file can change size (see
/// ``resize(to:)``); a block device cannot.
public final class FileBackend: NBDServerBackend {
    public var size: UInt64 { currentSize.withLockedValue { $0 } }
    public let isReadOnly: Bool
    public var flushCoversAllConnections: Bool { true }
    /// Zeroing may fall back to writing zero bytes, so a fast zero is refused.
    public var zeroIsFast: Bool { false }
    private let file: LocalFile
    private let currentSize: NIOLockedValueBox<UInt64>

    /// Opens `path` (for reading only with `readOnly`): a regular file or a block device.
    public init(path: String, readOnly: Bool = false) throws {
        do {
            let file = try LocalFile(path: path, access: readOnly ? .read : .readWrite)
            guard file.kind != .stream, let size = try file.size() else {
                throw NBDServerError(.EINVAL, "cannot serve \(path): it is neither a file nor a block device")
            }
            self.file = file
            self.currentSize = NIOLockedValueBox(size)
        } catch let error as FileIOError {
            throw NBDServerError(.EIO, "cannot open \(path): \(error)")
        }
        isReadOnly = readOnly
    }

    public func read(at offset: UInt64, length: Int) async throws -> ByteBuffer {
        var buffer = ByteBuffer()
        let count = try await mapped("read", at: offset) { try await self.file.read(into: &buffer, at: offset, length: length) }
        guard count == length else { throw NBDServerError(.EIO, "read failed at \(offset): the file ended") }
        return buffer
    }

    public func write(_ data: ByteBuffer, at offset: UInt64, fua: Bool) async throws {
        try await write(segments: [data], at: offset, fua: fua)
    }

    /// The pieces as they arrived, with no gathering copy.
    public func write(segments: [ByteBuffer], at offset: UInt64, fua: Bool) async throws {
        try await mapped("write", at: offset) {
            try await self.file.write(segments, at: offset)
            if fua { try await self.file.sync() }
        }
    }

    public func flush() async throws {
        try await mapped("fsync", at: 0) { try await self.file.sync() }
    }

    /// Frees the range where the system can; otherwise a hint with no effect.
    public func trim(at offset: UInt64, length: UInt64) async throws {
        _ = try await mapped("trim", at: offset) { try await self.file.discard(offset..<offset + length) }
    }

    /// A punched hole, or with `noHole` the range zeroed in place (FALLOC_FL_ZERO_RANGE,
    /// BLKZEROOUT, or zero bytes written).
    public func zero(at offset: UInt64, length: UInt64, noHole: Bool) async throws {
        _ = try await mapped("zero", at: offset) { try await self.file.zero(offset..<offset + length, mayPunch: !noHole) }
    }

    public func extents(at offset: UInt64, length: UInt64) async throws -> [BlockDescriptor] {
        // The whole range (a 64-bit request may ask for a terabyte in one go), in at most
        // `BlockDescriptor.mostInOneAnswer` extents: the client asks again from where the answer ends.
        let (end, overflow) = offset.addingReportingOverflow(length)
        let extents = try await mapped("block status", at: offset) {
            try await self.file.extents(in: offset..<(overflow ? UInt64.max : end), size: self.size, limit: BlockDescriptor.mostInOneAnswer)
        }
        return extents.map { BlockDescriptor(length: UInt64($0.range.count), flags: $0.isHole ? 3 : 0) }
    }

    /// Sets the file's length with `ftruncate`: what a grow adds reads as zeroes and takes no
    /// space; a shrink frees what is cut off. A block device keeps its size (`EPERM`); a file
    /// system without room for the new length answers `ENOSPC`.
    public func resize(to size: UInt64) async throws {
        guard file.kind == .regular else { throw NBDServerError(.EPERM, "a block device cannot change size") }
        do {
            try await file.blocking { [file] in try file.setLength(size) }
        } catch let error as FileIOError {
            throw NBDServerError(error.isOutOfSpace ? .ENOSPC : .EIO, "cannot make the file \(size) bytes long: \(error)")
        }
        currentSize.withLockedValue { $0 = size }
    }

    /// Runs `body`, turning the C library's errors into the NBD error the client gets.
    private func mapped<Result>(_ what: String, at offset: UInt64, _ body: () async throws -> Result) async throws -> Result {
        do {
            return try await body()
        } catch let error as FileIOError {
            throw NBDServerError(error.isOutOfSpace ? .ENOSPC : .EIO, "\(what) failed at \(offset): \(error)")
        }
    }
}
