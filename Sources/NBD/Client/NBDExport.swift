@_spi(NBDMachines) import NBDCore
import NBDEventLoop
import NIOConcurrencyHelpers
import NIOCore

/// An export in the transmission phase: the only type that can read, write and query.
///
/// Obtained from ``NBDConnection/go(_:requests:)``, ``NBDConnection/exportName(_:)`` or the
/// one-call ``connect(to:configuration:)-(NBDURI,_)``. `Sendable` and safe to use from many tasks at once:
/// requests are pipelined with unique cookies, replies matched in any order, and at most
/// ``NBDClientConfiguration/maximumRequestsInFlight`` are on the wire at a time.
///
/// Every request is checked before it is sent (libnbd's "strict mode"): a command or flag the
/// export did not advertise, a zero length, a range past the end or one not aligned to the
/// minimum block size fails with `NBDError` and nothing is sent. Reads and writes larger than
/// the maximum payload are split into several requests.
///
/// A server that sets `NBD_FLAG_SEND_RESIZE` lets ``resize(to:)`` change the export's size.
///
/// End it with ``disconnect()`` (soft: in-flight requests finish, then `NBD_CMD_DISC`).
/// An export dropped without it is disconnected softly in the background.
public final class NBDExport: Sendable {
    /// The export's name, size, flags and block sizes; the size is that of the last
    /// ``resize(to:)``.
    public var info: NBDExportInfo {
        var info = negotiatedInfo
        info.size = size
        return info
    }
    /// How requests and replies are framed: `.extended` (64-bit requests and block status),
    /// `.structured` or `.simple`.
    public let transmissionFormat: TransmissionFormat
    /// Whether replies come as chunks, structured or extended (sparse reads, block status,
    /// error messages).
    public var structuredReplies: Bool { transmissionFormat.hasChunks }
    /// The metadata contexts usable with ``blockStatus(at:length:flags:)``.
    public let metaContexts: [NBDMetaContext]
    /// The TLS version in use (for example `tlsv13`), or nil when the connection is in clear.
    public let tlsVersion: String?
    /// The TLS cipher suite in use, by its IANA name (for example `TLS_AES_256_GCM_SHA384`), or
    /// nil when the connection is in clear.
    public let tlsCipherSuite: String?

    let channel: Channel
    let handler: NIOLoopBound<NBDClientChannelHandler>
    /// What negotiation said.
    private let negotiatedInfo: NBDExportInfo
    /// The size: the negotiated one, then that of each resize as its reply comes.
    private let currentSize: NIOLockedValueBox<UInt64>
    private let executor: EventLoopTaskExecutor

    /// The thread that reads this export's replies, as a task executor. Tasks that issue many
    /// requests run fastest there: each resumes where its reply was read, with no thread hop.
    ///
    /// ```swift
    /// try await withTaskExecutorPreference(export.taskExecutor) {
    ///     try await export.read(into: &buffer, at: offset, length: length)
    /// }
    /// ```
    ///
    /// Only code that waits on I/O belongs there: long computations would hold up the replies
    /// of every task using the export. The executor lives as long as the event loop: with an
    /// ``NBDClientConfiguration/eventLoopGroup`` of your own, shut the group down only once the
    /// tasks using it have finished.
    public var taskExecutor: any TaskExecutor { executor }

    init(
        channel: Channel,
        handler: NIOLoopBound<NBDClientChannelHandler>,
        info: NBDExportInfo,
        transmissionFormat: TransmissionFormat,
        metaContexts: [NBDMetaContext],
        tlsVersion: String?,
        tlsCipherSuite: String?,
        configuration: NBDClientConfiguration
    ) {
        self.channel = channel
        self.handler = handler
        self.negotiatedInfo = info
        self.currentSize = NIOLockedValueBox(info.size)
        self.transmissionFormat = transmissionFormat
        self.metaContexts = metaContexts
        self.tlsVersion = tlsVersion
        self.tlsCipherSuite = tlsCipherSuite
        self.executor = EventLoopTaskExecutor(channel.eventLoop)
    }

    deinit {
        let handler = self.handler
        channel.eventLoop.execute { _ = handler.value.disconnect() }
    }

    /// The export's size in bytes: the negotiated one, then that of each ``resize(to:)``.
    public var size: UInt64 { currentSize.withLockedValue { $0 } }

    /// READ data read from the socket straight into its destination so far (see `DirectRead`).
    var bytesReadDirectly: Int {
        get async { (try? await channel.eventLoop.submit { [handler] in handler.value.bytesReadDirectly }.get()) ?? 0 }
    }

    // MARK: Commands

    /// `NBD_CMD_READ`: returns `length` bytes from `offset` in a new buffer.
    /// Holes in a structured reply read as zeroes. `flags` may hold `.dontFragment`.
    ///
    /// In clear, the data of a reply of 64 KiB or more is read from the socket straight into
    /// the new buffer. Over TLS, data that arrives in one piece is returned as it arrived,
    /// without a copy: a read of 128 KiB or more may then share storage with a receive buffer
    /// of up to 1 MiB. Holding many such buffers for long holds that memory too;
    /// ``read(into:at:length:flags:)`` fills a buffer you own instead.
    nonisolated(nonsending) public func read(at offset: UInt64, length: UInt64, flags: CommandFlags = []) async throws -> ByteBuffer {
        let length = try bufferSize(of: length)
        let destination = ReadDestination(exportOffset: offset, length: length, allocator: channel.allocator)
        _ = try await perform(.read, flags: flags, offset: offset, length: UInt64(length), destination: destination)
        return destination.take()
    }

    /// `NBD_CMD_READ` into a buffer the caller owns: `length` bytes from `offset` are appended
    /// to `buffer`, written in place as they arrive. Reusing one buffer (`clear()` between reads)
    /// avoids an allocation per read. On failure `buffer` is left as it was.
    ///
    /// In clear, the data of a reply of 64 KiB or more is read from the socket straight into
    /// `buffer`, as libnbd does; smaller replies, and data over TLS, are copied into it once.
    nonisolated(nonsending) public func read(
        into buffer: inout ByteBuffer,
        at offset: UInt64,
        length: UInt64,
        flags: CommandFlags = []
    ) async throws {
        let length = try bufferSize(of: length)
        // Moved, not copied, so that the storage stays uniquely owned and is filled in place.
        var taken = ByteBuffer()
        swap(&taken, &buffer)
        let destination = ReadDestination(appendingTo: consume taken, exportOffset: offset, length: length)
        do {
            _ = try await perform(.read, flags: flags, offset: offset, length: UInt64(length), destination: destination)
            buffer = destination.take()
        } catch {
            buffer = destination.take()
            buffer.moveWriterIndex(to: destination.start)
            throw error
        }
    }

    /// `NBD_CMD_READ` with no copy at all: the data comes back as the pieces it arrived in,
    /// slices of the connection's receive buffers, in export order (a hole as a buffer of
    /// zeroes). Together they hold `length` bytes. Made for passing data on, to
    /// ``write(segments:at:flags:)`` of another export, a file or a socket: each piece keeps
    /// its receive buffer (256 KiB in clear, up to 1 MiB over TLS) alive, so hand them on and
    /// let them go; the connection reuses a receive buffer once nothing holds a piece of it.
    nonisolated(nonsending) public func readSegments(
        at offset: UInt64,
        length: UInt64,
        flags: CommandFlags = []
    ) async throws -> [ByteBuffer] {
        let length = try bufferSize(of: length)
        let destination = ReadDestination(segmentsOf: length, exportOffset: offset)
        _ = try await perform(.read, flags: flags, offset: offset, length: UInt64(length), destination: destination)
        return destination.takeSegments()
    }

    /// A read's length as a buffer size.
    private func bufferSize(of length: UInt64) throws -> Int {
        guard let size = Int(exactly: length) else { throw NBDError.invalidArgument("a read of \(length) bytes cannot fit in memory") }
        return size
    }

    /// `NBD_CMD_WRITE`: writes the readable bytes of `data` at `offset`. `flags` may hold `.fua`.
    nonisolated(nonsending) public func write(_ data: ByteBuffer, at offset: UInt64, flags: CommandFlags = []) async throws {
        try await write(segments: [data], at: offset, flags: flags)
    }

    /// `NBD_CMD_WRITE` of the readable bytes of several buffers, one after another, at `offset`:
    /// they are sent as they are, not gathered into one (what ``readSegments(at:length:flags:)``
    /// returns can be passed on this way). `flags` may hold `.fua`.
    nonisolated(nonsending) public func write(segments: [ByteBuffer], at offset: UInt64, flags: CommandFlags = []) async throws {
        let length = segments.reduce(UInt64(0)) { $0 + UInt64($1.readableBytes) }
        _ = try await perform(.write, flags: flags, offset: offset, length: length, payload: segments)
    }

    /// `NBD_CMD_FLUSH`: every write already answered reaches permanent storage.
    nonisolated(nonsending) public func flush() async throws {
        _ = try await perform(.flush, flags: [], offset: 0, length: 0)
    }

    /// `NBD_CMD_TRIM`: the range is no longer needed; the server may discard it. With extended
    /// headers the whole range goes in one request (a server that finds it too large with
    /// `EOVERFLOW` gets it again in pieces of under 4 GiB, as without them).
    nonisolated(nonsending) public func trim(at offset: UInt64, length: UInt64, flags: CommandFlags = []) async throws {
        _ = try await perform(.trim, flags: flags, offset: offset, length: length)
    }

    /// `NBD_CMD_CACHE`: the range will be read soon.
    nonisolated(nonsending) public func cache(at offset: UInt64, length: UInt64) async throws {
        _ = try await perform(.cache, flags: [], offset: offset, length: length)
    }

    /// `NBD_CMD_WRITE_ZEROES`: the range reads as zeroes afterwards. `flags` may hold `.fua`,
    /// `.noHole` (keep it allocated) and `.fastZero` (fail with `ENOTSUP` unless it is fast).
    /// One request with extended headers, as ``trim(at:length:flags:)``.
    nonisolated(nonsending) public func writeZeroes(at offset: UInt64, length: UInt64, flags: CommandFlags = []) async throws {
        _ = try await perform(.writeZeroes, flags: flags, offset: offset, length: length)
    }

    /// `NBD_CMD_BLOCK_STATUS`: the status of the range in every negotiated metadata context.
    /// The server may describe less than asked (or, for the last extent, more); ask again from
    /// the end of what came back. `flags` may hold `.requestOne`. With extended headers the
    /// whole range is asked for in one request, however long; without, at most 4 GiB of it.
    nonisolated(nonsending) public func blockStatus(
        at offset: UInt64,
        length: UInt64,
        flags: CommandFlags = []
    ) async throws -> NBDBlockStatus {
        try await blockStatus(at: offset, length: length, flags: flags, only: nil)
    }

    /// `NBD_CMD_BLOCK_STATUS` for some of the negotiated metadata contexts only, named in
    /// `contexts`: the server answers for those alone (the payload form of the request). Needs
    /// extended headers and a server that advertises `NBD_FLAG_BLOCK_STATUS_PAYLOAD`
    /// (`info.canBlockStatusPayload`); otherwise, or for a context that was not
    /// negotiated, it fails with nothing sent.
    nonisolated(nonsending) public func blockStatus(
        at offset: UInt64,
        length: UInt64,
        contexts: [NBDMetaContext],
        flags: CommandFlags = []
    ) async throws -> NBDBlockStatus {
        var ids: [UInt32] = []
        for wanted in contexts {
            guard let context = metaContexts.first(where: { $0 == wanted }) else {
                throw NBDError.invalidArgument("the metadata context \(wanted.name) was not negotiated")
            }
            if !ids.contains(context.id) { ids.append(context.id) }
        }
        return try await blockStatus(at: offset, length: length, flags: flags, only: ids)
    }

    nonisolated(nonsending) private func blockStatus(
        at offset: UInt64,
        length: UInt64,
        flags: CommandFlags,
        only: [UInt32]?
    ) async throws -> NBDBlockStatus {
        let descriptors = try await perform(.blockStatus, flags: flags, offset: offset, length: length, onlyContexts: only)
        return NBDBlockStatus(offset: offset, descriptors: descriptors, metaContexts: metaContexts)
    }

    /// `NBD_CMD_RESIZE`: changes the export's size to `size` bytes, when the server advertises
    /// the experimental RESIZE extension (`info.canResize`); otherwise, for a read-only export,
    /// or for a size that is not a multiple of the minimum block size, it fails with nothing
    /// sent.
    ///
    /// The resize goes on the wire once no request touching the bytes between the old and the
    /// new size is there, and requests to those bytes wait for its reply, as the extension
    /// demands; requests elsewhere go on. Afterwards ``size`` and strict mode follow the new
    /// size, and requests past it fail. Resizes made at the same time go one after the other,
    /// in the order they were made; ``size`` follows each reply.
    /// Once sent, a resize cannot be taken back: cancelling the task does not stop the wait for
    /// the server's answer.
    ///
    /// Other connections to the export learn the size from their server; ``NBDClient`` makes
    /// its connections follow.
    public func resize(to size: UInt64) async throws {
        let currentSize = self.currentSize
        // Not cancellable once submitted: the server may resize whatever the caller does now.
        // The size is recorded on the event loop as the reply comes: replies come in the order
        // the machine sent the resizes, and so the sizes are recorded.
        _ = try await perform(.resize, flags: [], offset: size, length: 0, cancellable: false) {
            currentSize.withLockedValue { $0 = size }
        }
    }

    /// Another connection to the export resized it: requests are bounded by `size` from now on.
    func exportResizedElsewhere(to size: UInt64) async {
        currentSize.withLockedValue { $0 = size }
        let handler = self.handler
        try? await channel.eventLoop.submit { handler.value.exportResizedElsewhere(to: size) }.get()
    }

    // MARK: Ends

    /// Soft disconnect: waits for the requests in flight, sends `NBD_CMD_DISC`, closes.
    /// Requests made afterwards fail.
    public func disconnect() async {
        let handler = self.handler
        try? await channel.eventLoop.flatSubmit { handler.value.disconnect() }.get()
    }

    /// Hard disconnect: closes the socket now; requests in flight fail. Prefer ``disconnect()``.
    public func close() async {
        try? await channel.close()
    }

    // MARK: Internals

    /// Submits one request and waits for its answer: the extents of a BLOCK_STATUS by context
    /// id, nothing for the rest. The connection's state machine applies strict mode, splits it
    /// as the protocol wants, and answers once every piece is done, so that no reply still
    /// writes into a buffer handed back to the caller. Unless `cancellable`, cancelling the task
    /// once the request is submitted does not stop the wait; `whenAnswered` runs on the event
    /// loop on success, before the caller resumes.
    private func perform(
        _ type: CommandType,
        flags: CommandFlags,
        offset: UInt64,
        length: UInt64,
        onlyContexts: [UInt32]? = nil,
        payload: [ByteBuffer] = [],
        destination: ReadDestination? = nil,
        cancellable: Bool = true,
        whenAnswered: (@Sendable () -> Void)? = nil
    ) async throws -> [UInt32: [BlockDescriptor]] {
        let loop = channel.eventLoop
        let request = PendingRequest(
            type,
            flags: flags,
            offset: offset,
            length: length,
            onlyContexts: onlyContexts,
            payload: payload,
            destination: destination
        )
        request.whenAnswered = whenAnswered
        let handler = self.handler
        guard !Task.isCancelled else { throw CancellationError() }
        // The caller's continuation is the request's on the event loop, as the rest of it.
        guard cancellable else {
            return try await withUnsafeThrowingContinuation { caller in
                loop.runOnLoop {
                    request.caller = caller
                    handler.value.submit(request)
                }
            }
        }
        return try await withTaskCancellationHandler {
            try await withUnsafeThrowingContinuation { caller in
                loop.runOnLoop {
                    request.caller = caller
                    handler.value.submit(request)
                }
            }
        } onCancel: {
            loop.execute { handler.value.cancel(request) }
        }
    }
}
