import NIOCore

/// Something a copy or a checksum reads: an export (``NBDEndpoint``), a file, a block device or
/// standard input (``FileEndpoint``), or made up (``SyntheticSource``).
///
/// A source of your own needs ``size`` and ``read(into:at:length:worker:)``; the rest has
/// defaults. Reads come from several workers at once, each for a range no other worker reads.
public protocol CopySource: CopyEndpoint {
    /// Size in bytes, or nil for a stream (standard input) read until its end.
    var size: UInt64? { get }
    /// Ranges known to read as zeroes, within `offset..<offset+length`, in order: they are
    /// not read. None, by default.
    func zeroRanges(from offset: UInt64, length: UInt64) async throws -> [Range<UInt64>]
    /// True when ``cleanRanges(from:length:)`` may name ranges: the source of an incremental
    /// copy, which goes onto a full copy of the source's size and cannot be hashed whole.
    var hasCleanRanges: Bool { get }
    /// Ranges that need no copying (clean in the dirty bitmap of an incremental copy), within
    /// `offset..<offset+length`, in order. None, by default.
    func cleanRanges(from offset: UInt64, length: UInt64) async throws -> [Range<UInt64>]
    /// What ``cleanRanges(from:length:)`` reads (the name of a dirty bitmap), which a journal
    /// records: a resumed copy must read the same. Nil, by default.
    var cleanRangesName: String? { get }
    /// What tells the source's present state from any other, when the source can tell it
    /// itself (a regular file: its inode, size and change time), which a journal records: a
    /// copy resumed from a different state is refused. Nil (the default) when it cannot (an
    /// export can change between runs with nothing to show for it).
    var stateIdentity: String? { get }
    /// Appends up to `length` bytes at `offset` (fewer only at the end of a stream) to `buffer`:
    /// each worker reads into a buffer of its own, again and again, so that the copy's memory
    /// is its workers' buffers and no more.
    nonisolated(nonsending) func read(into buffer: inout ByteBuffer, at offset: UInt64, length: Int, worker: Int) async throws
    /// The same bytes in the pieces they arrived in, for data that is hashed or thrown away
    /// at once: an export's receive buffers, free again as soon as the pieces are dropped.
    /// Nil (the default): the source has no such pieces, and the data is read into the
    /// worker's own buffer instead.
    nonisolated(nonsending) func readSegments(at offset: UInt64, length: Int, worker: Int) async throws -> [ByteBuffer]?
    /// True when reading waits for other threads and never holds up the caller's (an export,
    /// a file read on the thread pool); false (the default) when reading is work on the
    /// caller's thread.
    var readsOffThread: Bool { get }
    /// Lets go of what the source holds (connections, descriptors). Nothing, by default.
    func close() async
}

/// Something a copy writes to: an export (``NBDEndpoint``), a file, a block device or
/// standard output (``FileEndpoint``), or nowhere (``NullDestination``).
///
/// Writes and zeroes come from several workers at once, each for a range no other touches,
/// unless ``isSequential`` asks for them one at a time, in order.
public protocol CopyDestination: CopyEndpoint {
    /// Size in bytes, or nil when any size fits (a stream, `null:`, a file that grows).
    var size: UInt64? { get }
    /// How many bytes it holds now, when it has a size of its own (an export, a file or a
    /// block device): what a resumable copy's journal records. ``size``, by default.
    var currentSize: UInt64? { get }
    /// True when the destination reads as zeroes where nothing was written: zero areas of the
    /// source are then skipped, not zeroed.
    var startsZeroed: Bool { get }
    /// True when writes must come in order (standard output).
    var isSequential: Bool { get }
    /// True when what is written is thrown away (`null:`): no point looking for zeroes.
    /// False, by default.
    var discards: Bool { get }
    /// True when opening the destination created or extended it: it cannot hold an earlier
    /// copy, so an incremental copy and the resumption of a journal refuse it. False, by
    /// default.
    var isNew: Bool { get }
    /// Writes `data`, one buffer after another, from `offset`.
    nonisolated(nonsending) func write(_ data: [ByteBuffer], at offset: UInt64, worker: Int) async throws
    /// Makes `length` bytes at `offset` read as zeroes.
    nonisolated(nonsending) func zero(at offset: UInt64, length: UInt64, worker: Int) async throws
    /// Makes the destination ready for a copy that has accepted it, before anything is
    /// written: a file shorter than the source is extended. Nothing, by default.
    func prepare() async throws
    /// Makes what was written durable.
    func flush() async throws
    /// Lets go of what the destination holds (connections, descriptors).
    func close() async
}

/// What sources and destinations share: where their I/O completes, and what sizes the copy's
/// requests.
public protocol CopyEndpoint: Sendable {
    /// The executor worker `worker` runs on with the least thread hopping (an NBD connection's
    /// event loop), if any. None, by default.
    func taskExecutor(for worker: Int) -> (any TaskExecutor)?
    /// For an export, the connections its requests spread over: the copy keeps its requests
    /// in flight on each. Nil (the default) for local I/O, which waits only for the thread
    /// pool.
    var connectionCount: Int? { get }
    /// The request size the endpoint serves best (an export's preferred block size): the
    /// copy's requests are at least this large. Nil, by default.
    var preferredRequestSize: UInt64? { get }
    /// For an export that rides out restarts, whether it is waiting now for a lost connection
    /// to be made again (``CopyProgress/Snapshot/reconnecting``); nil (the default) for what
    /// never reconnects.
    var isReconnecting: Bool? { get }
}

extension CopyEndpoint {
    public func taskExecutor(for worker: Int) -> (any TaskExecutor)? { nil }
    public var connectionCount: Int? { nil }
    public var preferredRequestSize: UInt64? { nil }
    public var isReconnecting: Bool? { nil }
}

extension CopyDestination {
    public func prepare() async throws {}
    public var discards: Bool { false }
    public var isNew: Bool { false }
    public var currentSize: UInt64? { size }
}

extension CopySource {
    /// Up to `length` bytes at `offset`, in a new buffer: for reads off the copy's path.
    nonisolated(nonsending) public func read(at offset: UInt64, length: Int, worker: Int) async throws -> ByteBuffer {
        var buffer = ByteBuffer()
        try await read(into: &buffer, at: offset, length: length, worker: worker)
        return buffer
    }

    nonisolated(nonsending) public func readSegments(at offset: UInt64, length: Int, worker: Int) async throws -> [ByteBuffer]? { nil }
    public var readsOffThread: Bool { false }

    public func zeroRanges(from offset: UInt64, length: UInt64) async throws -> [Range<UInt64>] { [] }
    public var hasCleanRanges: Bool { false }
    public var cleanRangesName: String? { nil }
    public var stateIdentity: String? { nil }
    public func cleanRanges(from offset: UInt64, length: UInt64) async throws -> [Range<UInt64>] { [] }
    public func close() async {}
}
