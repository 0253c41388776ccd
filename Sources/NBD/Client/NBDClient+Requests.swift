@_spi(NBDMachines) import NBDCore
import NIOCore

// The data calls of NBDExport, each on the connection with the fewest bytes outstanding and,
// when reconnecting is on, sent again if that connection is lost before the reply.
extension NBDClient {
    /// `NBD_CMD_READ`: `length` bytes from `offset` in a new buffer. See
    /// ``NBDExport/read(at:length:flags:)``.
    nonisolated(nonsending) public func read(at offset: UInt64, length: UInt64, flags: CommandFlags = []) async throws -> ByteBuffer {
        try await withConnection(weight: Self.weight(length)) { try await $0.read(at: offset, length: length, flags: flags) }
    }

    /// `NBD_CMD_READ` appended to a buffer you own. See ``NBDExport/read(into:at:length:flags:)``:
    /// on failure `buffer` is left as it was, so a request sent again starts clean.
    nonisolated(nonsending) public func read(
        into buffer: inout ByteBuffer,
        at offset: UInt64,
        length: UInt64,
        flags: CommandFlags = []
    ) async throws {
        // Moved, not copied, so that the storage stays uniquely owned and is filled in place.
        var taken = ByteBuffer()
        swap(&taken, &buffer)
        defer { swap(&taken, &buffer) }
        try await withConnection(weight: Self.weight(length)) { try await $0.read(into: &taken, at: offset, length: length, flags: flags) }
    }

    /// `NBD_CMD_READ` as the pieces the data arrived in. See ``NBDExport/readSegments(at:length:flags:)``.
    nonisolated(nonsending) public func readSegments(
        at offset: UInt64,
        length: UInt64,
        flags: CommandFlags = []
    ) async throws -> [ByteBuffer] {
        try await withConnection(weight: Self.weight(length)) { try await $0.readSegments(at: offset, length: length, flags: flags) }
    }

    /// `NBD_CMD_WRITE` of `data` at `offset`. A write sent again after a lost connection
    /// goes from the same buffer: nothing is copied to make that possible. Once answered, it is
    /// kept in the replay log until a flush covers it (see ``Configuration-swift.struct/replayWindow``).
    nonisolated(nonsending) public func write(_ data: ByteBuffer, at offset: UInt64, flags: CommandFlags = []) async throws {
        try await write(segments: [data], at: offset, flags: flags)
    }

    /// `NBD_CMD_WRITE` of several buffers, one after another. See ``NBDExport/write(segments:at:flags:)``.
    nonisolated(nonsending) public func write(segments: [ByteBuffer], at offset: UInt64, flags: CommandFlags = []) async throws {
        let length = segments.reduce(0) { $0 + $1.readableBytes }
        let answer = Self.logged(.write(segments, flags: flags), at: offset, length: UInt64(length))
        try await withConnection(weight: length, logs: answer) { try await $0.write(segments: segments, at: offset, flags: flags) }
    }

    /// `NBD_CMD_WRITE_ZEROES`. See ``NBDExport/writeZeroes(at:length:flags:)``.
    nonisolated(nonsending) public func writeZeroes(at offset: UInt64, length: UInt64, flags: CommandFlags = []) async throws {
        let answer = Self.logged(.writeZeroes(flags: flags), at: offset, length: length)
        try await withConnection(weight: 0, logs: answer) { try await $0.writeZeroes(at: offset, length: length, flags: flags) }
    }

    /// `NBD_CMD_TRIM`. See ``NBDExport/trim(at:length:flags:)``.
    nonisolated(nonsending) public func trim(at offset: UInt64, length: UInt64, flags: CommandFlags = []) async throws {
        let answer = Self.logged(.trim, at: offset, length: length)
        try await withConnection(weight: 0, logs: answer) { try await $0.trim(at: offset, length: length, flags: flags) }
    }

    /// `NBD_CMD_CACHE`. See ``NBDExport/cache(at:length:)``.
    nonisolated(nonsending) public func cache(at offset: UInt64, length: UInt64) async throws {
        try await withConnection(weight: 0) { try await $0.cache(at: offset, length: length) }
    }

    /// `NBD_CMD_RESIZE`: changes the export's size, when the server advertises the experimental
    /// RESIZE extension (`info.canResize`). See ``NBDExport/resize(to:)``.
    ///
    /// The extension asks that no request be outstanding to the bytes between the two sizes
    /// while a resize is, on any connection: the resize waits until no other request of this
    /// client is out, and requests made meanwhile wait for it. Afterwards every connection, and
    /// every reconnection, works to the new size. A connection lost with the resize unanswered
    /// sends it again on another (resizing twice to one size is harmless); a reconnection made
    /// meanwhile may find the export at either size.
    public func resize(to size: UInt64) async throws {
        try await resizing(to: size) {
            try await withConnection(weight: 0, alone: true) { export, slot in
                try await export.resize(to: size)
                await resized(to: size, through: slot)
            }
        }
    }

    /// `NBD_CMD_FLUSH`: every write already answered, on any connection, reaches permanent
    /// storage. One connection is enough: with more than one the server set
    /// `NBD_FLAG_CAN_MULTI_CONN`, which promises that "the effects of NBD_CMD_FLUSH ... MUST
    /// be visible across all connections".
    ///
    /// Across a reconnection too: a server that restarted gets the writes it had answered and
    /// not flushed again from the replay log before anything else, so that a flush answered
    /// by it covers every write answered before the flush was made. With the replay window
    /// off, the first flush after a reconnection that may have lost such writes fails instead,
    /// with `NBDError.Code.writesInDoubt` naming their byte ranges; the next
    /// one succeeds as usual.
    nonisolated(nonsending) public func flush() async throws {
        let sequence = try await flushCovering()
        guard let doubt = flushed(through: sequence) else { return }
        let ranges = doubt.ranges.prefix(8).map { "\($0.lowerBound)-\($0.upperBound - 1)" }.joined(separator: ", ")
        let more = doubt.ranges.count > 8 ? " and \(doubt.ranges.count - 8) more ranges" : ""
        throw NBDError(
            .writesInDoubt,
            "the server went away with writes it had answered and not flushed, which it may have lost (the replay "
                + "window is off): bytes \(ranges)\(more), \(doubt.byteCount) bytes in all",
            connectionUsable: true
        )
    }

    /// `NBD_CMD_BLOCK_STATUS`. See ``NBDExport/blockStatus(at:length:flags:)``.
    nonisolated(nonsending) public func blockStatus(
        at offset: UInt64,
        length: UInt64,
        flags: CommandFlags = []
    ) async throws -> NBDBlockStatus {
        try await withConnection(weight: 0) { try await $0.blockStatus(at: offset, length: length, flags: flags) }
    }

    /// `NBD_CMD_BLOCK_STATUS` for some contexts only. See ``NBDExport/blockStatus(at:length:contexts:flags:)``.
    nonisolated(nonsending) public func blockStatus(
        at offset: UInt64,
        length: UInt64,
        contexts: [NBDMetaContext],
        flags: CommandFlags = []
    ) async throws -> NBDBlockStatus {
        try await withConnection(weight: 0) { try await $0.blockStatus(at: offset, length: length, contexts: contexts, flags: flags) }
    }

    /// The extents of one metadata context over `range` (default: the whole export), in order,
    /// as ``NBDExport/extents(of:in:)`` walks them.
    public func extents(of context: NBDMetaContext = .baseAllocation, in range: Range<UInt64>? = nil) -> NBDExtentSequence {
        NBDExtentSequence(source: self, context: context, range: range)
    }

    /// Whether `context` was negotiated. Waits for a connection.
    public func hasMetaContext(_ context: NBDMetaContext) async throws -> Bool {
        try await metaContexts.contains(context)
    }

    /// What the replay log keeps of an answered write, write-zeroes or trim: each of them, FUA
    /// or not. One with FUA is durable once answered, but an earlier entry it overwrote is sent
    /// again after a reconnection, and would bring the older bytes back if it were not sent
    /// after it (found by the pool simulation).
    static func logged(
        _ operation: ReplayLog.Operation,
        at offset: UInt64,
        length: UInt64
    ) -> (operation: ReplayLog.Operation, offset: UInt64, length: UInt64) {
        (operation, offset, length)
    }

    /// A request's share of a connection's load: its data.
    private static func weight(_ length: UInt64) -> Int { Int(min(length, UInt64(Int.max))) }
}

extension NBDClient: BlockStatusSource {
    func scope(of context: NBDMetaContext) async throws -> (size: UInt64, negotiated: Bool) {
        try await withConnection(weight: 0) { ($0.size, $0.hasMetaContext(context)) }
    }
}
