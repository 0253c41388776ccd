import NIOCore

/// The data calls of an export, whichever object makes them: one connection (``NBDExport``) or
/// a pool of connections that rides out restarts (``NBDClient``).
///
/// Code that reads and writes an export (a copy, a backup, a file system) takes
/// `some NBDExportAccess` and works with either. What it may do is told by properties, as
/// libnbd's `can_*` calls tell it: ``info`` (`canTrim`, `canZero`, `canFlush`, `isReadOnly`,
/// block sizes), ``metaContexts``, ``connectionCount``; never by asking which type it is.
///
/// ```swift
/// func backUp(_ export: some NBDExportAccess, to file: FileHandle) async throws {
///     let size = try await export.size
///     var offset: UInt64 = 0
///     while offset < size {
///         let piece = try await export.read(at: offset, length: min(1 << 20, size - offset), flags: [])
///         try file.write(contentsOf: piece.readableBytesView)
///         offset += UInt64(piece.readableBytes)
///     }
/// }
/// ```
///
/// The requests are those of ``NBDExport``, whose documentation says what each one sends and
/// when it fails with nothing sent.
public protocol NBDExportAccess: AnyObject, Sendable {
    /// The export's name, size, flags and block sizes as negotiated.
    var info: NBDExportInfo { get async throws }
    /// The export's size in bytes now (it follows resizes).
    var size: UInt64 { get async throws }
    /// The metadata contexts negotiated, which ``blockStatus(at:length:flags:)`` reports.
    var metaContexts: [NBDMetaContext] { get async throws }
    /// The TLS version of the connection (for example `tlsv13`), or nil in clear.
    var tlsVersion: String? { get async throws }
    /// Connections the requests spread over now: 1 for an ``NBDExport``.
    var connectionCount: Int { get }
    /// True while a lost connection is being dialled again (an ``NBDClient`` with a reconnect
    /// delay); requests meanwhile wait. Always false for an ``NBDExport``.
    var isReconnecting: Bool { get }
    /// The thread of connection `index` (wrapping around), as a task executor: a task that
    /// issues many requests loses less to thread hops there.
    func taskExecutor(for index: Int) -> any TaskExecutor

    /// `NBD_CMD_READ`: `length` bytes at `offset`, in a new buffer.
    nonisolated(nonsending) func read(at offset: UInt64, length: UInt64, flags: CommandFlags) async throws -> ByteBuffer
    /// `NBD_CMD_READ` into `buffer`, appended: a caller that reads again and again reuses one
    /// buffer.
    nonisolated(nonsending) func read(into buffer: inout ByteBuffer, at offset: UInt64, length: UInt64, flags: CommandFlags) async throws
    /// `NBD_CMD_READ`, the data in the pieces it arrived in (no copy).
    nonisolated(nonsending) func readSegments(at offset: UInt64, length: UInt64, flags: CommandFlags) async throws -> [ByteBuffer]
    /// `NBD_CMD_WRITE` of `data` at `offset`.
    nonisolated(nonsending) func write(_ data: ByteBuffer, at offset: UInt64, flags: CommandFlags) async throws
    /// `NBD_CMD_WRITE` of `segments`, one after another, from `offset`.
    nonisolated(nonsending) func write(segments: [ByteBuffer], at offset: UInt64, flags: CommandFlags) async throws
    /// `NBD_CMD_WRITE_ZEROES`: `flags` may hold `.noHole`, `.fastZero` and `.fua`.
    nonisolated(nonsending) func writeZeroes(at offset: UInt64, length: UInt64, flags: CommandFlags) async throws
    /// `NBD_CMD_TRIM`.
    nonisolated(nonsending) func trim(at offset: UInt64, length: UInt64, flags: CommandFlags) async throws
    /// `NBD_CMD_CACHE`.
    nonisolated(nonsending) func cache(at offset: UInt64, length: UInt64) async throws
    /// `NBD_CMD_FLUSH`: returns when every write answered before it is durable.
    nonisolated(nonsending) func flush() async throws
    /// `NBD_CMD_BLOCK_STATUS` in every negotiated metadata context.
    nonisolated(nonsending) func blockStatus(at offset: UInt64, length: UInt64, flags: CommandFlags) async throws -> NBDBlockStatus
    /// `NBD_CMD_BLOCK_STATUS` for the metadata contexts in `contexts` only.
    nonisolated(nonsending) func blockStatus(
        at offset: UInt64,
        length: UInt64,
        contexts: [NBDMetaContext],
        flags: CommandFlags
    ) async throws -> NBDBlockStatus
    /// `NBD_CMD_RESIZE` to `size` bytes.
    func resize(to size: UInt64) async throws
    /// The extents of `context` over `range` (nil: the whole export), in order.
    func extents(of context: NBDMetaContext, in range: Range<UInt64>?) -> NBDExtentSequence
}

extension NBDExport: NBDExportAccess {
    /// 1: one connection.
    public var connectionCount: Int { 1 }

    /// False: a lost connection ends an export.
    public var isReconnecting: Bool { false }

    /// The connection's thread, whatever `index`: see ``taskExecutor``.
    public func taskExecutor(for index: Int) -> any TaskExecutor { taskExecutor }
}

extension NBDClient: NBDExportAccess {}
