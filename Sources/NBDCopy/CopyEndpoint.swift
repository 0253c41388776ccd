import NIOCore

/// Where `nbd copy` reads from.
package protocol CopySource: CopyEndpoint {
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
package protocol CopyDestination: CopyEndpoint {
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
package protocol CopyEndpoint: Sendable {
    /// The executor worker `worker` runs on with the least thread hopping, if any.
    func taskExecutor(for worker: Int) -> (any TaskExecutor)?
}

extension CopyEndpoint {
    package func taskExecutor(for worker: Int) -> (any TaskExecutor)? { nil }
}

extension CopyDestination {
    package var discards: Bool { false }
    package var currentSize: UInt64? { size }
}

extension CopySource {
    /// Up to `length` bytes at `offset`, in a new buffer: for reads off the copy's path.
    package func read(at offset: UInt64, length: Int, worker: Int) async throws -> ByteBuffer {
        var buffer = ByteBuffer()
        try await read(into: &buffer, at: offset, length: length, worker: worker)
        return buffer
    }

    package func readSegments(at offset: UInt64, length: Int, worker: Int) async throws -> [ByteBuffer]? { nil }
    package var readsOffThread: Bool { false }

    package func zeroRanges(from offset: UInt64, length: UInt64) async throws -> [Range<UInt64>] { [] }
    package func cleanRanges(from offset: UInt64, length: UInt64) async throws -> [Range<UInt64>] { [] }
    package func close() async {}
}
