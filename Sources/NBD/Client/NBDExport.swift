import NBDCore
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
    /// The size, and the one a resize in progress goes to.
    private let sizes: NIOLockedValueBox<(current: UInt64, target: UInt64?)>
    /// Strict mode for an export whose size cannot change; nil when it can.
    private let fixedValidator: RequestValidator?
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
        self.sizes = NIOLockedValueBox((info.size, nil))
        self.transmissionFormat = transmissionFormat
        self.metaContexts = metaContexts
        self.tlsVersion = tlsVersion
        self.tlsCipherSuite = tlsCipherSuite
        self.fixedValidator =
            info.canResize ? nil : RequestValidator(export: info, format: transmissionFormat, hasMetaContexts: !metaContexts.isEmpty)
        self.executor = EventLoopTaskExecutor(channel.eventLoop)
    }

    deinit {
        let handler = self.handler
        channel.eventLoop.execute { _ = handler.value.disconnect() }
    }

    /// The export's size in bytes: the negotiated one, then that of each ``resize(to:)``.
    public var size: UInt64 { sizes.withLockedValue { $0.current } }

    /// Strict mode's checks. While a resize is in progress requests may reach up to the larger
    /// of the two sizes: the connection's state machine holds back those between the two until
    /// the server has answered, then fails those past the size it settled on.
    private var validator: RequestValidator {
        if let fixedValidator { return fixedValidator }
        var export = negotiatedInfo
        export.size = sizes.withLockedValue { max($0.current, $0.target ?? 0) }
        return RequestValidator(export: export, format: transmissionFormat, hasMetaContexts: !metaContexts.isEmpty)
    }

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
    public func read(at offset: UInt64, length: UInt64, flags: CommandFlags = []) async throws -> ByteBuffer {
        let length = try validateRead(at: offset, length: length, flags: flags)
        let destination = ReadDestination(exportOffset: offset, length: length, allocator: channel.allocator)
        _ = try await perform(readRequests(offset: offset, length: length, flags: flags, into: destination))
        return destination.take()
    }

    /// `NBD_CMD_READ` into a buffer the caller owns: `length` bytes from `offset` are appended
    /// to `buffer`, written in place as they arrive. Reusing one buffer (`clear()` between reads)
    /// avoids an allocation per read. On failure `buffer` is left as it was.
    ///
    /// In clear, the data of a reply of 64 KiB or more is read from the socket straight into
    /// `buffer`, as libnbd does; smaller replies, and data over TLS, are copied into it once.
    public func read(into buffer: inout ByteBuffer, at offset: UInt64, length: UInt64, flags: CommandFlags = []) async throws {
        let length = try validateRead(at: offset, length: length, flags: flags)
        // Moved, not copied, so that the storage stays uniquely owned and is filled in place.
        var taken = ByteBuffer()
        swap(&taken, &buffer)
        let destination = ReadDestination(appendingTo: consume taken, exportOffset: offset, length: length)
        do {
            _ = try await perform(readRequests(offset: offset, length: length, flags: flags, into: destination))
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
    public func readSegments(at offset: UInt64, length: UInt64, flags: CommandFlags = []) async throws -> [ByteBuffer] {
        let length = try validateRead(at: offset, length: length, flags: flags)
        let destination = ReadDestination(segmentsOf: length, exportOffset: offset)
        _ = try await perform(readRequests(offset: offset, length: length, flags: flags, into: destination))
        return destination.takeSegments()
    }

    /// Strict mode for the three kinds of READ: a bad one fails here and nothing is sent.
    /// Returns the length as a buffer size.
    private func validateRead(at offset: UInt64, length: UInt64, flags: CommandFlags) throws -> Int {
        try validator.validate(.read, flags: flags, offset: offset, length: length)
        guard let size = Int(exactly: length) else { throw NBDError.invalidArgument("a read of \(length) bytes cannot fit in memory") }
        return size
    }

    /// The READ requests that fill `destination`, split at the maximum payload.
    private func readRequests(offset: UInt64, length: Int, flags: CommandFlags, into destination: ReadDestination) -> [PendingRequest] {
        pieces(offset: offset, length: UInt64(length), limit: UInt64(info.maximumPayload)).map { piece in
            PendingRequest(
                .read,
                flags: flags,
                offset: piece.offset,
                length: piece.length,
                destination: destination,
                promise: channel.eventLoop.makePromise()
            )
        }
    }

    /// `NBD_CMD_WRITE`: writes the readable bytes of `data` at `offset`. `flags` may hold `.fua`.
    public func write(_ data: ByteBuffer, at offset: UInt64, flags: CommandFlags = []) async throws {
        try await write(segments: [data], at: offset, flags: flags)
    }

    /// `NBD_CMD_WRITE` of the readable bytes of several buffers, one after another, at `offset`:
    /// they are sent as they are, not gathered into one (what ``readSegments(at:length:flags:)``
    /// returns can be passed on this way). `flags` may hold `.fua`.
    public func write(segments: [ByteBuffer], at offset: UInt64, flags: CommandFlags = []) async throws {
        let length = segments.reduce(UInt64(0)) { $0 + UInt64($1.readableBytes) }
        try validator.validate(.write, flags: flags, offset: offset, length: length)
        var rest = segments[...]
        let requests = pieces(offset: offset, length: length, limit: UInt64(info.maximumPayload)).map { piece in
            PendingRequest(
                .write,
                flags: flags,
                offset: piece.offset,
                length: piece.length,
                payload: Self.take(Int(piece.length), from: &rest),
                promise: channel.eventLoop.makePromise()
            )
        }
        _ = try await perform(requests)
    }

    /// The first `count` bytes of `buffers`, as slices; what is left stays in `buffers`.
    private static func take(_ count: Int, from buffers: inout ArraySlice<ByteBuffer>) -> [ByteBuffer] {
        var taken: [ByteBuffer] = []
        var missing = count
        while missing > 0, var first = buffers.first {
            let slice = first.readSlice(length: min(missing, first.readableBytes))!
            missing -= slice.readableBytes
            if first.readableBytes == 0 { buffers.removeFirst() } else { buffers[buffers.startIndex] = first }
            if slice.readableBytes > 0 { taken.append(slice) }
        }
        return taken
    }

    /// `NBD_CMD_FLUSH`: every write already answered reaches permanent storage.
    public func flush() async throws {
        try validator.validate(.flush, flags: [], offset: 0, length: 0)
        _ = try await perform([PendingRequest(.flush, flags: [], offset: 0, length: 0, promise: channel.eventLoop.makePromise())])
    }

    /// `NBD_CMD_TRIM`: the range is no longer needed; the server may discard it. With extended
    /// headers the whole range goes in one request (a server that finds it too large with
    /// `EOVERFLOW` gets it again in pieces of under 4 GiB, as without them).
    public func trim(at offset: UInt64, length: UInt64, flags: CommandFlags = []) async throws {
        try await effect(.trim, offset: offset, length: length, flags: flags)
    }

    /// `NBD_CMD_CACHE`: the range will be read soon.
    public func cache(at offset: UInt64, length: UInt64) async throws {
        try await effect(.cache, offset: offset, length: length, flags: [])
    }

    /// `NBD_CMD_WRITE_ZEROES`: the range reads as zeroes afterwards. `flags` may hold `.fua`,
    /// `.noHole` (keep it allocated) and `.fastZero` (fail with `ENOTSUP` unless it is fast).
    /// One request with extended headers, as ``trim(at:length:flags:)``.
    public func writeZeroes(at offset: UInt64, length: UInt64, flags: CommandFlags = []) async throws {
        try await effect(.writeZeroes, offset: offset, length: length, flags: flags)
    }

    /// `NBD_CMD_BLOCK_STATUS`: the status of the range in every negotiated metadata context.
    /// The server may describe less than asked (or, for the last extent, more); ask again from
    /// the end of what came back. `flags` may hold `.requestOne`. With extended headers the
    /// whole range is asked for in one request, however long; without, at most 4 GiB of it.
    public func blockStatus(at offset: UInt64, length: UInt64, flags: CommandFlags = []) async throws -> NBDBlockStatus {
        try await blockStatus(at: offset, length: length, flags: flags, only: nil)
    }

    /// `NBD_CMD_BLOCK_STATUS` for some of the negotiated metadata contexts only, named in
    /// `contexts`: the server answers for those alone (the payload form of the request). Needs
    /// extended headers and a server that advertises `NBD_FLAG_BLOCK_STATUS_PAYLOAD`
    /// (`info.canBlockStatusPayload`); otherwise, or for a context that was not
    /// negotiated, it fails with nothing sent.
    public func blockStatus(
        at offset: UInt64,
        length: UInt64,
        contexts: [NBDMetaContext],
        flags: CommandFlags = []
    ) async throws -> NBDBlockStatus {
        guard transmissionFormat == .extended, info.canBlockStatusPayload else {
            throw NBDError.unsupported("block status for some contexts only needs extended headers and NBD_FLAG_BLOCK_STATUS_PAYLOAD")
        }
        var ids: [UInt32] = []
        for wanted in contexts {
            guard let context = metaContexts.first(where: { $0 == wanted }) else {
                throw NBDError.invalidArgument("the metadata context \(wanted.name) was not negotiated")
            }
            if !ids.contains(context.id) { ids.append(context.id) }
        }
        guard !ids.isEmpty else { throw NBDError.invalidArgument("block status for no metadata context") }
        return try await blockStatus(at: offset, length: length, flags: flags, only: ids)
    }

    private func blockStatus(at offset: UInt64, length: UInt64, flags: CommandFlags, only: [UInt32]?) async throws -> NBDBlockStatus {
        try validator.validate(.blockStatus, flags: flags, offset: offset, length: length)
        let asked = transmissionFormat == .extended ? length : min(length, Self.largestEffectLength)
        let descriptors = try await perform([
            PendingRequest(
                .blockStatus,
                flags: flags,
                offset: offset,
                length: asked,
                onlyContexts: only,
                promise: channel.eventLoop.makePromise()
            )
        ])
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
    /// size, and requests past it fail. One resize at a time: another one made meanwhile fails.
    /// Once sent, a resize cannot be taken back: cancelling the task does not stop the wait for
    /// the server's answer.
    ///
    /// Other connections to the export learn the size from their server; ``NBDClient`` makes
    /// its connections follow.
    public func resize(to size: UInt64) async throws {
        try validator.validateResize(to: size)
        let alone = sizes.withLockedValue { sizes in
            guard sizes.target == nil else { return false }
            sizes.target = size
            return true
        }
        guard alone else { throw NBDError.invalidArgument("another resize of this export is in progress") }
        let request = PendingRequest(.resize, flags: [], offset: size, length: 0, promise: channel.eventLoop.makePromise())
        let handler = self.handler
        do {
            guard !Task.isCancelled else {
                channel.eventLoop.runOnLoop { request.fail(CancellationError()) }
                throw CancellationError()
            }
            channel.eventLoop.runOnLoop { handler.value.submit([request]) }
            // Not cancellable: the server may resize whatever the caller does now.
            _ = try await request.future.get()
            sizes.withLockedValue { $0 = (size, nil) }
        } catch {
            sizes.withLockedValue { $0.target = nil }
            throw error
        }
    }

    /// Another connection to the export resized it: requests are bounded by `size` from now on.
    func exportResizedElsewhere(to size: UInt64) async {
        sizes.withLockedValue { $0.current = size }
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

    /// Largest length of one request without payload: 2^32 less 64 KiB, a multiple of any
    /// minimum block size.
    static let largestEffectLength: UInt64 = 0xFFFF_0000

    /// TRIM, WRITE_ZEROES or CACHE of the range: in one request with extended headers, in
    /// pieces under 4 GiB without them or when the server finds one request too large
    /// ("MAY reply with an NBD_EOVERFLOW ... error if the oversize request would require too
    /// many server resources").
    private func effect(_ type: CommandType, offset: UInt64, length: UInt64, flags: CommandFlags) async throws {
        try validator.validate(type, flags: flags, offset: offset, length: length)
        if transmissionFormat == .extended, length > Self.largestEffectLength {
            do {
                _ = try await perform([
                    PendingRequest(type, flags: flags, offset: offset, length: length, promise: channel.eventLoop.makePromise())
                ])
                return
            } catch let error as NBDError where error.serverErrno == .EOVERFLOW {
                // Too large for the server at once: in pieces, as without extended headers.
            }
        }
        let requests = pieces(offset: offset, length: length, limit: Self.largestEffectLength).map { piece in
            PendingRequest(type, flags: flags, offset: piece.offset, length: piece.length, promise: channel.eventLoop.makePromise())
        }
        _ = try await perform(requests)
    }

    private func pieces(offset: UInt64, length: UInt64, limit: UInt64) -> [(offset: UInt64, length: UInt64)] {
        stride(from: UInt64(0), to: length, by: Int(limit)).map { start in
            (offset + start, min(limit, length - start))
        }
    }

    /// Sends the requests and waits for all of them: a failure is thrown only once every piece
    /// has finished, so no reply still writes into a buffer handed back to the caller.
    private func perform(_ requests: [PendingRequest]) async throws -> [UInt32: [BlockDescriptor]] {
        let handler = self.handler
        let loop = channel.eventLoop
        guard !Task.isCancelled else {
            // Each request was made with a promise of the event loop's: failed, not dropped,
            // or NIO reports it leaked (and a debug build stops there).
            loop.runOnLoop { for request in requests { request.fail(CancellationError()) } }
            throw CancellationError()
        }
        return try await withTaskCancellationHandler {
            loop.runOnLoop { handler.value.submit(requests) }
            var firstError: (any Error)?
            var result: [UInt32: [BlockDescriptor]] = [:]
            for request in requests {
                do {
                    result = try await request.future.get()
                } catch {
                    if firstError == nil { firstError = error }
                }
            }
            if let firstError { throw firstError }
            return result
        } onCancel: {
            loop.execute {
                for request in requests { handler.value.cancel(request) }
            }
        }
    }
}
