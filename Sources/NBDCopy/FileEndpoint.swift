import Foundation
import NBDSystem
import NIOCore

/// A local file or block device, or standard input or output, through the package's file
/// layer: pread/pwrite on a thread pool, the holes of a sparse source skipped, the zero ranges
/// of a destination punched (or zeroed in place with `--allocated`).
package final class FileEndpoint: CopySource, CopyDestination {
    package let file: LocalFile
    package let size: UInt64?
    package let startsZeroed: Bool
    /// Zero ranges are allocated (`--allocated`): zeroed in place, never punched.
    private let allocates: Bool
    package var isSequential: Bool { file.kind == .stream }
    package var readsOffThread: Bool { true }

    /// Opens `path` to read.
    package static func source(_ path: String) throws -> FileEndpoint {
        if path == "-" { return FileEndpoint(LocalFile(standardStream: 0), size: nil, startsZeroed: false, allocates: false) }
        do {
            let file = try LocalFile(path: path, access: .read)
            return FileEndpoint(file, size: try file.size(), startsZeroed: false, allocates: false)
        } catch {
            throw NBDCopyError(.fileFailed, "cannot open \(path): \(error)")
        }
    }

    /// Opens `path` to write `size` bytes: a new file is created and a short regular file extended
    /// (both then read as zeroes where nothing is written); a smaller block device is an error.
    /// With `allocates`, nothing counts as zeroed already: every zero area is zeroed in place.
    package static func destination(_ path: String, size: UInt64?, destinationIsZero: Bool, allocates: Bool = false) throws -> FileEndpoint
    {
        if path == "-" { return FileEndpoint(LocalFile(standardStream: 1), size: nil, startsZeroed: false, allocates: false) }
        let existed = FileManager.default.fileExists(atPath: path)
        let file: LocalFile
        let current: UInt64
        do {
            file = try LocalFile(path: path, access: .createOrWrite)
            current = try file.size() ?? 0
        } catch {
            throw NBDCopyError(.fileFailed, "cannot open \(path): \(error)")
        }
        var zeroed = destinationIsZero || !existed
        if let size, current < size, file.kind != .stream {
            guard file.kind == .regular else {
                throw NBDCopyError(.sizeMismatch, "the destination \(path) (\(current) bytes) is smaller than the source (\(size) bytes)")
            }
            do {
                try file.setLength(size)
            } catch {
                throw NBDCopyError(.fileFailed, "cannot extend \(path) to \(size) bytes: \(error)")
            }
            zeroed = zeroed || current == 0
        }
        return FileEndpoint(file, size: nil, startsZeroed: zeroed && !allocates, allocates: allocates)
    }

    package var currentSize: UInt64? { try? file.size() }

    private init(_ file: LocalFile, size: UInt64?, startsZeroed: Bool, allocates: Bool) {
        self.file = file
        self.size = size
        self.startsZeroed = startsZeroed
        self.allocates = allocates
    }

    /// The holes of a sparse file (SEEK_HOLE): not read, and zeroed at the destination only
    /// when it did not start zeroed.
    package func zeroRanges(from offset: UInt64, length: UInt64) async throws -> [Range<UInt64>] {
        guard let size, file.kind == .regular else { return [] }
        var holes: [Range<UInt64>] = []
        var position = offset
        let end = min(size, offset + length)
        while position < end {
            let extents = try await file.extents(in: position..<end, size: size, limit: 1 << 16)
            guard let last = extents.last else { break }
            holes += extents.filter(\.isHole).map(\.range)
            position = last.range.upperBound
        }
        return holes
    }

    package func read(into buffer: inout ByteBuffer, at offset: UInt64, length: Int, worker: Int) async throws {
        do {
            try await file.read(into: &buffer, at: offset, length: length)
        } catch {
            throw NBDCopyError(.fileFailed, "read failed: \(error)")
        }
    }

    package func write(_ data: [ByteBuffer], at offset: UInt64, worker: Int) async throws {
        do {
            try await file.write(data, at: offset)
        } catch {
            throw NBDCopyError(
                .fileFailed,
                file.kind == .stream ? "writing to standard output failed (\(error)): the copy is incomplete" : "write failed: \(error)"
            )
        }
    }

    /// Only for a destination that did not start zeroed (an existing file, stdout): new and
    /// extended files are left with holes by not writing at all.
    package func zero(at offset: UInt64, length: UInt64, worker: Int) async throws {
        do {
            try await file.zero(offset..<offset + length, mayPunch: !allocates)
        } catch {
            throw NBDCopyError(.fileFailed, "zeroing failed at offset \(offset): \(error)")
        }
    }

    package func flush() async throws {
        do {
            try await file.sync()
        } catch {
            throw NBDCopyError(.fileFailed, "fsync failed: \(error)")
        }
    }

    /// The descriptor is closed with the file.
    package func close() async {}
}
