import Foundation
import NBDSystem
import NIOCore

/// A local file or block device, or standard input or output, through the package's file
/// layer: pread/pwrite on a thread pool, the holes of a sparse source skipped, the zero ranges
/// of a destination punched (or zeroed in place with `allocates`).
public final class FileEndpoint: CopySource, CopyDestination {
    package let file: LocalFile
    /// The file's size, as a source; nil for standard input, and for any destination (a file
    /// grows as written, a block device's size is checked when it is opened).
    public let size: UInt64?
    public let startsZeroed: Bool
    /// Zero ranges are allocated (`--allocated`): zeroed in place, never punched.
    private let allocates: Bool
    /// This destination was created or extended when it was opened: it cannot hold what an
    /// earlier run of a resumed copy wrote.
    public let isNew: Bool
    /// As a source, what the file was when it was opened (device, inode, size, modification
    /// and change times), which a journal records; nil for a block device or a stream.
    public let stateIdentity: String?
    /// The length a destination shorter than the source gets in ``prepare()``, and its path.
    private let pendingLength: (length: UInt64, path: String)?
    public var isSequential: Bool { file.kind == .stream }
    public var readsOffThread: Bool { true }

    /// Standard input, read until its end.
    public static var standardInput: FileEndpoint {
        FileEndpoint(LocalFile(standardStream: 0), size: nil, startsZeroed: false, allocates: false)
    }

    /// Standard output, written in order.
    public static var standardOutput: FileEndpoint {
        FileEndpoint(LocalFile(standardStream: 1), size: nil, startsZeroed: false, allocates: false)
    }

    /// Opens the file or block device at `path` to read (`-`: standard input).
    public static func source(_ path: String) throws -> FileEndpoint {
        if path == "-" { return standardInput }
        do {
            let file = try LocalFile(path: path, access: .read)
            return FileEndpoint(file, size: try file.size(), startsZeroed: false, allocates: false, stateIdentity: file.stateIdentity())
        } catch {
            throw NBDCopyError(.fileFailed, "cannot open \(path): \(error)")
        }
    }

    /// Opens the file or block device at `path` (`-`: standard output) to write `size` bytes:
    /// a new file is created, and a short regular file is extended once a copy accepts it
    /// (``prepare()``; both then read as zeroes where nothing is written); a smaller block
    /// device is an error.
    ///
    /// - Parameters:
    ///   - path: the file or block device; `-` is standard output.
    ///   - size: the source's size, when it has one.
    ///   - destinationIsZero: the file is known to read as zeroes already (nbdcopy's
    ///     `--target-is-zero`): zero areas of the source are skipped.
    ///   - allocates: zero areas are zeroed in place, never punched, and nothing counts as
    ///     zeroed already: the file ends fully allocated.
    public static func destination(
        _ path: String,
        size: UInt64?,
        destinationIsZero: Bool = false,
        allocates: Bool = false
    ) throws -> FileEndpoint {
        if path == "-" { return standardOutput }
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
        var grownTo: UInt64?
        if let size, current < size, file.kind != .stream {
            guard file.kind == .regular else {
                throw NBDCopyError(.sizeMismatch, "the destination \(path) (\(current) bytes) is smaller than the source (\(size) bytes)")
            }
            // Extended once a copy has accepted it (``prepare()``), not now: a copy that refuses
            // the destination (an incremental one onto a shorter file) leaves it as it was.
            zeroed = zeroed || current == 0
            grownTo = size
        }
        return FileEndpoint(
            file,
            size: nil,
            startsZeroed: zeroed && !allocates,
            allocates: allocates,
            isNew: !existed || grownTo != nil,
            pendingLength: grownTo.map { ($0, path) }
        )
    }

    /// Extends a destination shorter than the source to the source's size, once a copy has
    /// accepted it.
    public func prepare() async throws {
        guard let (length, path) = pendingLength, (try? file.size()).map({ $0 < length }) ?? true else { return }
        do {
            try file.setLength(length)
        } catch {
            throw NBDCopyError(.fileFailed, "cannot extend \(path) to \(length) bytes: \(error)")
        }
    }

    public var currentSize: UInt64? { try? file.size() }

    private init(
        _ file: LocalFile,
        size: UInt64?,
        startsZeroed: Bool,
        allocates: Bool,
        isNew: Bool = false,
        pendingLength: (length: UInt64, path: String)? = nil,
        stateIdentity: String? = nil
    ) {
        self.file = file
        self.size = size
        self.startsZeroed = startsZeroed
        self.allocates = allocates
        self.isNew = isNew
        self.pendingLength = pendingLength
        self.stateIdentity = stateIdentity
    }

    /// The holes of a sparse file (SEEK_HOLE): not read, and zeroed at the destination only
    /// when it did not start zeroed.
    public func zeroRanges(from offset: UInt64, length: UInt64) async throws -> [Range<UInt64>] {
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

    public func read(into buffer: inout ByteBuffer, at offset: UInt64, length: Int, worker: Int) async throws {
        do {
            try await file.read(into: &buffer, at: offset, length: length)
        } catch {
            throw NBDCopyError(.fileFailed, "read failed: \(error)")
        }
    }

    public func write(_ data: [ByteBuffer], at offset: UInt64, worker: Int) async throws {
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
    public func zero(at offset: UInt64, length: UInt64, worker: Int) async throws {
        do {
            try await file.zero(offset..<offset + length, mayPunch: !allocates)
        } catch {
            throw NBDCopyError(.fileFailed, "zeroing failed at offset \(offset): \(error)")
        }
    }

    public func flush() async throws {
        do {
            try await file.sync()
        } catch {
            throw NBDCopyError(.fileFailed, "fsync failed: \(error)")
        }
    }

    /// The descriptor is closed with the file.
    public func close() async {}
}
