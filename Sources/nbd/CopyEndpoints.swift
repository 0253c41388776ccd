import Foundation
import NBD
import NBDServer
import NBDSystem
import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Where `nbd copy` reads from.
protocol CopySource: CopyEndpoint {
    /// Size in bytes, or nil for a stream (stdin) read until its end.
    var size: UInt64? { get }
    /// Ranges known to read as zeroes, within `offset..<offset+length`, in order.
    func zeroRanges(from offset: UInt64, length: UInt64) async throws -> [Range<UInt64>]
    /// Ranges that need no copying (clean in the dirty bitmap of an incremental copy), within
    /// `offset..<offset+length`, in order.
    func cleanRanges(from offset: UInt64, length: UInt64) async throws -> [Range<UInt64>]
    /// Appends up to `length` bytes at `offset` (fewer only at the end of a stream) to `buffer`:
    /// each worker reads into a buffer of its own, again and again, so that the copy's memory
    /// is its workers' buffers and no more.
    func read(into buffer: inout ByteBuffer, at offset: UInt64, length: Int, worker: Int) async throws
    /// The same bytes in the pieces they arrived in, for data that is hashed or thrown away
    /// at once: an export's receive buffers, free again as soon as the pieces are dropped.
    /// Nil (the default): the source has no such pieces, and the data is read into the
    /// worker's own buffer instead.
    func readSegments(at offset: UInt64, length: Int, worker: Int) async throws -> [ByteBuffer]?
    /// True when reading waits for other threads and never holds up the caller's (an export,
    /// a file read on the thread pool); false when reading is work on the caller's thread.
    var readsOffThread: Bool { get }
    func close() async
}

/// Where `nbd copy` writes to.
protocol CopyDestination: CopyEndpoint {
    /// Size in bytes, or nil when any size fits (a stream, `null:`, a file that grows).
    var size: UInt64? { get }
    /// How many bytes it holds now, when it has a size of its own (an export, a file or a
    /// block device): what a resumable copy's journal records.
    var currentSize: UInt64? { get }
    /// True when the destination reads as zeroes where nothing was written.
    var startsZeroed: Bool { get }
    /// True when writes must come in order (stdout).
    var isSequential: Bool { get }
    /// True when what is written is thrown away (`null:`): no point looking for zeroes.
    var discards: Bool { get }
    /// Writes `data`, one buffer after another, from `offset`.
    func write(_ data: [ByteBuffer], at offset: UInt64, worker: Int) async throws
    func zero(at offset: UInt64, length: UInt64, worker: Int) async throws
    func flush() async throws
    func close() async
}

/// An endpoint whose I/O completes on threads of its own (an NBD connection's event loop).
protocol CopyEndpoint: Sendable {
    /// The executor worker `worker` runs on with the least thread hopping, if any.
    func taskExecutor(for worker: Int) -> (any TaskExecutor)?
}

extension CopyEndpoint {
    func taskExecutor(for worker: Int) -> (any TaskExecutor)? { nil }
}

extension CopyDestination {
    var discards: Bool { false }
    var currentSize: UInt64? { size }
}

extension CopySource {
    /// Up to `length` bytes at `offset`, in a new buffer: for reads off the copy's path.
    func read(at offset: UInt64, length: Int, worker: Int) async throws -> ByteBuffer {
        var buffer = ByteBuffer()
        try await read(into: &buffer, at: offset, length: length, worker: worker)
        return buffer
    }

    func readSegments(at offset: UInt64, length: Int, worker: Int) async throws -> [ByteBuffer]? { nil }
    var readsOffThread: Bool { false }

    func zeroRanges(from offset: UInt64, length: UInt64) async throws -> [Range<UInt64>] { [] }
    func cleanRanges(from offset: UInt64, length: UInt64) async throws -> [Range<UInt64>] { [] }
    func close() async {}
}

// MARK: NBD

/// An export through an `NBDClient`: several connections when the server allows multi-conn,
/// and, with `--reconnect-delay`, riding out a server restart.
final class NBDEndpoint: CopySource, CopyDestination {
    let client: NBDClient
    let info: NBDExportInfo
    let startsZeroed: Bool
    /// The dirty-bitmap context whose clean extents an incremental copy skips.
    let bitmap: NBDMetaContext?
    /// Zeroes are written with NBD_CMD_FLAG_NO_HOLE: `--allocated`.
    let allocates: Bool
    /// Connections up when the copy started.
    let connections: Int
    private let hasAllocation: Bool
    private let isTLS: Bool
    /// The client's run(), until close().
    private let runner: Task<Void, any Error>
    var isSequential: Bool { false }
    var readsOffThread: Bool { true }
    var size: UInt64? { info.size }

    /// Opens the export: throws when the first connection cannot be made or the bitmap is
    /// missing. `onEvent` hears what happens to the connections (lost, reconnected).
    static func open(
        _ uri: NBDURI,
        connections: Int,
        requests: Int,
        destinationIsZero: Bool,
        bitmap: NBDMetaContext? = nil,
        allocates: Bool = false,
        configuration base: NBDClient.Configuration,
        onEvent: @escaping @Sendable (NBDClientEvent) -> Void = { _ in }
    ) async throws -> NBDEndpoint {
        var configuration = base
        configuration.connections = max(1, connections)
        configuration.connection.maximumRequestsInFlight = requests
        if let bitmap { configuration.connection.metaContexts.append(bitmap) }
        let client = NBDClient(uri, configuration: configuration)
        let runner = Task { try await client.run() }
        let listener = Task { for await event in client.events { onEvent(event) } }
        do {
            let info = try await client.info
            let contexts = try await client.metaContexts
            if let bitmap, !contexts.contains(bitmap) {
                throw CommandError("the source does not offer the metadata context \(bitmap.name) (qemu-nbd -B NAME exports a bitmap)")
            }
            return NBDEndpoint(
                client: client,
                info: info,
                startsZeroed: destinationIsZero,
                bitmap: bitmap,
                allocates: allocates,
                connections: client.connectionCount,
                hasAllocation: contexts.contains(.baseAllocation),
                isTLS: try await client.tlsVersion != nil,
                runner: runner
            )
        } catch {
            runner.cancel()
            listener.cancel()
            _ = await runner.result
            throw error
        }
    }

    private init(
        client: NBDClient,
        info: NBDExportInfo,
        startsZeroed: Bool,
        bitmap: NBDMetaContext?,
        allocates: Bool,
        connections: Int,
        hasAllocation: Bool,
        isTLS: Bool,
        runner: Task<Void, any Error>
    ) {
        self.client = client
        self.info = info
        self.startsZeroed = startsZeroed
        self.bitmap = bitmap
        self.allocates = allocates
        self.connections = connections
        self.hasAllocation = hasAllocation
        self.isTLS = isTLS
        self.runner = runner
    }

    /// Where worker `worker` runs best: on the thread of a connection, one per worker in turn.
    func taskExecutor(for worker: Int) -> (any TaskExecutor)? { client.taskExecutor(for: worker % connections) }

    func zeroRanges(from offset: UInt64, length: UInt64) async throws -> [Range<UInt64>] {
        guard hasAllocation else { return [] }
        var ranges: [Range<UInt64>] = []
        for try await extent in client.extents(in: offset..<offset + length) {
            guard case .allocation(let flags) = extent.status, flags.contains(.zero) else { continue }
            ranges.append(extent.range)
        }
        return ranges
    }

    func cleanRanges(from offset: UInt64, length: UInt64) async throws -> [Range<UInt64>] {
        guard let bitmap else { return [] }
        var ranges: [Range<UInt64>] = []
        // In a qemu:dirty-bitmap context, status bit 0 set means dirty (qemu's docs/interop/nbd.rst).
        for try await extent in client.extents(of: bitmap, in: offset..<offset + length) where extent.flags & 1 == 0 {
            ranges.append(extent.range)
        }
        return ranges
    }

    func read(into buffer: inout ByteBuffer, at offset: UInt64, length: Int, worker: Int) async throws {
        // In clear, the data goes from the socket straight into `buffer` (as libnbd reads):
        // nothing else holds it, not even SwiftNIO's receive buffers.
        try await client.read(into: &buffer, at: offset, length: UInt64(length))
    }

    func readSegments(at offset: UInt64, length: Int, worker: Int) async throws -> [ByteBuffer]? {
        // Over TLS the data comes out of the decryption in records of 16 KiB: gathering them
        // costs less than passing on so many small pieces.
        guard !isTLS else { return [try await client.read(at: offset, length: UInt64(length))] }
        return try await client.readSegments(at: offset, length: UInt64(length))
    }

    func write(_ data: [ByteBuffer], at offset: UInt64, worker: Int) async throws {
        try await client.write(segments: data, at: offset)
    }

    func zero(at offset: UInt64, length: UInt64, worker: Int) async throws {
        if info.canZero {
            // NO_HOLE "SHOULD be set to 1 if the client wants to ensure that the server does not
            // create a hole": what --allocated asks for.
            try await client.writeZeroes(at: offset, length: length, flags: allocates ? .noHole : [])
        } else {
            try await client.write(ByteBuffer(repeating: 0, count: Int(length)), at: offset)
        }
    }

    /// One flush covers every connection: with several, the server set CAN_MULTI_CONN.
    func flush() async throws {
        if info.canFlush { try await client.flush() }
    }

    func close() async {
        runner.cancel()
        _ = await runner.result
    }
}

// MARK: Files, block devices, stdin and stdout

/// A local file or block device, or standard input or output, through the package's file
/// layer: pread/pwrite on a thread pool, the holes of a sparse source skipped, the zero ranges
/// of a destination punched (or zeroed in place with `--allocated`).
final class FileEndpoint: CopySource, CopyDestination {
    let file: LocalFile
    let size: UInt64?
    let startsZeroed: Bool
    /// Zero ranges are allocated (`--allocated`): zeroed in place, never punched.
    private let allocates: Bool
    var isSequential: Bool { file.kind == .stream }
    var readsOffThread: Bool { true }

    /// Opens `path` to read.
    static func source(_ path: String) throws -> FileEndpoint {
        if path == "-" { return FileEndpoint(LocalFile(standardStream: 0), size: nil, startsZeroed: false, allocates: false) }
        do {
            let file = try LocalFile(path: path, access: .read)
            return FileEndpoint(file, size: try file.size(), startsZeroed: false, allocates: false)
        } catch {
            throw CommandError("cannot open \(path): \(error)")
        }
    }

    /// Opens `path` to write `size` bytes: a new file is created and a short regular file extended
    /// (both then read as zeroes where nothing is written); a smaller block device is an error.
    /// With `allocates`, nothing counts as zeroed already: every zero area is zeroed in place.
    static func destination(_ path: String, size: UInt64?, destinationIsZero: Bool, allocates: Bool = false) throws -> FileEndpoint {
        if path == "-" { return FileEndpoint(LocalFile(standardStream: 1), size: nil, startsZeroed: false, allocates: false) }
        let existed = FileManager.default.fileExists(atPath: path)
        let file: LocalFile
        let current: UInt64
        do {
            file = try LocalFile(path: path, access: .createOrWrite)
            current = try file.size() ?? 0
        } catch {
            throw CommandError("cannot open \(path): \(error)")
        }
        var zeroed = destinationIsZero || !existed
        if let size, current < size, file.kind != .stream {
            guard file.kind == .regular else {
                throw CommandError("the destination \(path) (\(current) bytes) is smaller than the source (\(size) bytes)")
            }
            do {
                try file.setLength(size)
            } catch {
                throw CommandError("cannot extend \(path) to \(size) bytes: \(error)")
            }
            zeroed = zeroed || current == 0
        }
        return FileEndpoint(file, size: nil, startsZeroed: zeroed && !allocates, allocates: allocates)
    }

    var currentSize: UInt64? { try? file.size() }

    private init(_ file: LocalFile, size: UInt64?, startsZeroed: Bool, allocates: Bool) {
        self.file = file
        self.size = size
        self.startsZeroed = startsZeroed
        self.allocates = allocates
    }

    /// The holes of a sparse file (SEEK_HOLE): not read, and zeroed at the destination only
    /// when it did not start zeroed.
    func zeroRanges(from offset: UInt64, length: UInt64) async throws -> [Range<UInt64>] {
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

    func read(into buffer: inout ByteBuffer, at offset: UInt64, length: Int, worker: Int) async throws {
        do {
            try await file.read(into: &buffer, at: offset, length: length)
        } catch {
            throw CommandError("read failed: \(error)")
        }
    }

    func write(_ data: [ByteBuffer], at offset: UInt64, worker: Int) async throws {
        do {
            try await file.write(data, at: offset)
        } catch {
            throw CommandError(
                file.kind == .stream ? "writing to standard output failed (\(error)): the copy is incomplete" : "write failed: \(error)"
            )
        }
    }

    /// Only for a destination that did not start zeroed (an existing file, stdout): new and
    /// extended files are left with holes by not writing at all.
    func zero(at offset: UInt64, length: UInt64, worker: Int) async throws {
        do {
            try await file.zero(offset..<offset + length, mayPunch: !allocates)
        } catch {
            throw CommandError("zeroing failed at offset \(offset): \(error)")
        }
    }

    func flush() async throws {
        do {
            try await file.sync()
        } catch {
            throw CommandError("fsync failed: \(error)")
        }
    }

    /// The descriptor is closed with the file.
    func close() async {}
}

// MARK: Synthetic endpoints

/// `null:`: discards everything.
struct NullDestination: CopyDestination {
    var discards: Bool { true }
    var size: UInt64? { nil }
    var startsZeroed: Bool { true }
    var isSequential: Bool { false }
    func write(_ data: [ByteBuffer], at offset: UInt64, worker: Int) async throws {}
    func zero(at offset: UInt64, length: UInt64, worker: Int) async throws {}
    func flush() async throws {}
    func close() async {}
}

/// `pattern:SIZE` (every 8-byte word holds its own offset, big-endian, like nbdkit's pattern
/// plugin) and `zero:SIZE` (all zeroes, known as such).
struct SyntheticSource: CopySource {
    let size: UInt64?
    let isZero: Bool

    func zeroRanges(from offset: UInt64, length: UInt64) async throws -> [Range<UInt64>] {
        isZero ? [offset..<(offset + length)] : []
    }

    func read(into buffer: inout ByteBuffer, at offset: UInt64, length: Int, worker: Int) async throws {
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
