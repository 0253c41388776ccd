import NIOCore

/// The client side of the transmission phase, without I/O.
///
/// It owns the table of requests in flight (cookie → request and a caller `Context`, such as
/// a promise), hands out cookies, and parses the server's replies. Only the table knows how
/// many data bytes follow a simple READ reply, so the parser lives here. Every reply is checked
/// against its request (chunk types, ranges, overlap, exact coverage, metadata context ids);
/// a breach of a MUST yields ``Action/fatal(_:_:)`` with every pending context, and the machine
/// accepts nothing more.
///
/// OFFSET_DATA and simple-reply data are not buffered: they come out as slices of the bytes
/// fed in, as soon as they arrive, so a caller can copy them straight to their destination.
///
/// Its code is `@inlinable`: it runs for every reply, and specialized for the caller's
/// `Context` it costs no generic dispatch.
@_spi(NBDMachines) public struct ClientTransmissionStateMachine<Context> {
    /// What negotiation agreed, and the bounds applied to replies.
    public struct Configuration: Sendable {
        /// How requests and replies are framed.
        public var format: TransmissionFormat
        /// The ids of the metadata contexts `NBD_OPT_SET_META_CONTEXT` selected.
        public var metaContextIDs: Set<UInt32>
        /// The ids of those whose status has 32 bits: "For metadata contexts that only return
        /// a 32-bit status (including all contexts in the "base:" namespace), the
        /// most-significant 32 bits of *status* MUST be all zeroes."
        public var narrowStatusContextIDs: Set<UInt32>
        /// Largest payload accepted for a chunk that is buffered whole (block status, errors).
        /// The spec says servers "SHOULD NOT send more than 2^20 extents in a single reply chunk".
        public var maximumBufferedChunkLength: Int

        /// A configuration with the given settings.
        public init(
            format: TransmissionFormat,
            metaContextIDs: Set<UInt32> = [],
            narrowStatusContextIDs: Set<UInt32> = [],
            maximumBufferedChunkLength: Int = 8 + 16 * (1 << 21)
        ) {
            self.format = format
            self.metaContextIDs = metaContextIDs
            self.narrowStatusContextIDs = narrowStatusContextIDs
            self.maximumBufferedChunkLength = maximumBufferedChunkLength
        }

        /// Whether replies come as chunks (structured or extended).
        @inlinable public var structuredReplies: Bool { format.hasChunks }
    }

    /// What the caller does next.
    public enum Action {
        /// Data for a READ: `bytes` belong at absolute export `offset`.
        case data(Context, offset: UInt64, bytes: ByteBuffer)
        /// A hole in a READ: `length` zero bytes at absolute export `offset`.
        case hole(Context, offset: UInt64, length: UInt32)
        /// The extents of one metadata context for a BLOCK_STATUS.
        case blockStatus(Context, contextID: UInt32, descriptors: [BlockDescriptor])
        /// The request is finished: successfully when `error` is nil.
        case complete(Context, error: NBDError?)
        /// The server broke the protocol or the connection ended: fail every context given,
        /// and close the connection.
        case fatal(NBDError, [Context])
    }

    @usableFromInline
    struct InFlight {
        @usableFromInline var header: RequestHeader
        @usableFromInline var context: Context
        @usableFromInline var coverage = RangeCoverage()
        @usableFromInline var contentChunks = 0
        @usableFromInline var contextsSeen: Set<UInt32> = []
        /// The contexts the reply must cover: all negotiated, or those of a payload filter.
        @usableFromInline var contextsWanted: Set<UInt32>
        /// The length of the export the request acts on (of a filtered BLOCK_STATUS, the one
        /// in its payload rather than the payload's length in the header).
        @usableFromInline var effectLength: UInt64
        /// The ids a filtered BLOCK_STATUS sends in its payload, in order; nil for the rest.
        @usableFromInline var filter: [UInt32]?
        @usableFromInline var error: NBDError?
        /// The caller's mark of when the request was sent (see ``startRequest(_:flags:offset:length:context:stamp:)``).
        @usableFromInline var stamp: UInt64 = 0

        @usableFromInline var range: Range<UInt64> { header.offset..<(header.offset + effectLength) }

        @usableFromInline
        init(header: RequestHeader, context: Context, effectLength: UInt64, contextsWanted: Set<UInt32>) {
            self.header = header
            self.context = context
            self.effectLength = effectLength
            self.contextsWanted = contextsWanted
        }
    }

    @usableFromInline
    enum ParseState {
        case header
        /// Streaming the last `remaining` of the `length` data bytes of a chunk (or simple
        /// reply) for `cookie`, the next at `offset`.
        case data(cookie: NBDCookie, offset: UInt64, remaining: Int, length: Int, done: Bool)
        case failed
    }

    /// What negotiation agreed.
    public var configuration: Configuration
    @usableFromInline var inFlight: [NBDCookie: InFlight] = [:]
    @usableFromInline var nextCookie: NBDCookie = 1
    @usableFromInline var parseState = ParseState.header
    @usableFromInline var input = ByteBuffer()
    /// Bytes fed behind `input` and not moved into it yet (see ``refill()``): appended to
    /// the few bytes of a header that `input` ends with, every read would be copied whole.
    @usableFromInline var queued = CircularBuffer<ByteBuffer>()
    /// How much ``refill()`` copies next; it doubles while one reply is being completed.
    @usableFromInline var refillSize = Self.firstRefillSize
    @usableFromInline var outbox = Outbox<Action>()

    /// A machine with no request in flight.
    @inlinable public init(configuration: Configuration) {
        self.configuration = configuration
    }

    /// How many requests await their reply.
    @inlinable public var inFlightCount: Int { inFlight.count }

    /// The request in flight with the smallest stamp (of those, the first sent), and that
    /// stamp; nil when none is.
    public var oldestInFlight: (header: RequestHeader, stamp: UInt64)? {
        inFlight.values.min { ($0.stamp, $0.header.cookie) < ($1.stamp, $1.header.cookie) }.map { ($0.header, $0.stamp) }
    }

    /// Whether a request in flight acts on a byte of `range` (a flush acts on none).
    @inlinable public func hasRequestInFlight(touching range: Range<UInt64>) -> Bool {
        inFlight.values.contains { request in
            request.header.type != .flush && range.overlaps(request.header.offset, length: request.effectLength)
        }
    }

    /// True once a fatal error was reported.
    @inlinable public var hasFailed: Bool { if case .failed = parseState { true } else { false } }

    /// Registers a request and returns its header, with a fresh cookie, to send with
    /// ``encode(_:into:)``. `NBD_CMD_DISC` gets no reply and is not registered. `stamp` marks
    /// when it was sent, in whatever unit the caller counts time (see ``oldestInFlight``).
    ///
    /// `length` is the length of the export the request acts on (a WRITE's data). With
    /// extended headers a WRITE is flagged `NBD_CMD_FLAG_PAYLOAD_LEN` ("the flag MUST be set
    /// for NBD_CMD_WRITE"), and a BLOCK_STATUS given `onlyContexts` is sent in the payload
    /// form that limits the reply to those ids (the server must advertise
    /// `NBD_FLAG_BLOCK_STATUS_PAYLOAD`); the header's length is then that of the payload.
    @inlinable public mutating func startRequest(
        _ type: CommandType,
        flags: CommandFlags = [],
        offset: UInt64,
        length: UInt64,
        onlyContexts: [UInt32]? = nil,
        context: Context,
        stamp: UInt64 = 0
    ) -> RequestHeader {
        let cookie = nextCookie
        nextCookie = nextCookie.next
        var flags = flags
        var headerLength = length
        if configuration.format == .extended, type == .write { flags.insert(.payloadLength) }
        if let onlyContexts {
            precondition(configuration.format == .extended && type == .blockStatus, "a block status filter needs extended headers")
            flags.insert(.payloadLength)
            headerLength = 8 + 4 * UInt64(onlyContexts.count)
        }
        let header = RequestHeader(flags: flags, type: type, cookie: cookie, offset: offset, length: headerLength)
        if type != .disconnect {
            let wanted = onlyContexts.map(Set.init) ?? configuration.metaContextIDs
            var request = InFlight(header: header, context: context, effectLength: length, contextsWanted: wanted)
            request.stamp = stamp
            request.filter = onlyContexts
            inFlight[cookie] = request
        }
        return header
    }

    /// Writes `header` as the negotiated format frames it, with the payload of a filtered
    /// BLOCK_STATUS ("64 bits, effect length; n * 32 bits, list of metacontext ids to use").
    /// A WRITE's data is the caller's to send after it.
    @inlinable public func encode(_ header: RequestHeader, into buffer: inout ByteBuffer) {
        header.encode(into: &buffer, format: configuration.format)
        // Only a BLOCK_STATUS has one: no other request pays for a look in the table.
        guard header.type == .blockStatus, let request = inFlight[header.cookie], let ids = request.filter else { return }
        buffer.writeInteger(request.effectLength)
        for id in ids { buffer.writeInteger(id) }
    }

    /// Appends bytes from the server. Bytes after a fatal error are ignored.
    @inlinable public mutating func feed(_ bytes: ByteBuffer) {
        guard !hasFailed, bytes.readableBytes > 0 else { return }
        if input.readableBytes == 0, queued.isEmpty {
            input = bytes
        } else {
            queued.append(bytes)
        }
    }

    /// Enough to finish any header: ``refill()`` copies this much first.
    @usableFromInline static var firstRefillSize: Int { 256 }

    /// Moves queued bytes into `input` when the parser needs more: the next buffer as it is
    /// once `input` is empty, else a piece of it copied behind what `input` ends with (the
    /// start of a header, or of a chunk it must see whole), in pieces that double so that no
    /// byte is copied more than about twice. False when nothing is queued.
    @inlinable mutating func refill() -> Bool {
        guard var next = queued.first else { return false }
        if input.readableBytes == 0 {
            input = queued.removeFirst()
            refillSize = Self.firstRefillSize
            return true
        }
        var piece = next.readSlice(length: min(refillSize, next.readableBytes))!
        // In a buffer of their own: `input` is most often the end of a large read, which
        // appending to would copy with all the room behind it.
        var joined = ByteBuffer()
        joined.reserveCapacity(input.readableBytes + piece.readableBytes)
        joined.writeBuffer(&input)
        joined.writeBuffer(&piece)
        input = joined
        if next.readableBytes == 0 { queued.removeFirst() } else { queued[queued.startIndex] = next }
        refillSize = min(refillSize * 2, Int.max / 2)
        return true
    }

    /// When the next bytes from the server are READ data and none are buffered: the request,
    /// the export offset of the next byte, how many data bytes follow, and how many the chunk
    /// (or simple reply) carries in all. A caller that can read from the socket itself may put
    /// them straight where they belong and report them with ``dataReadDirectly(_:)`` instead
    /// of feeding them.
    @inlinable public var expectedData: (context: Context, offset: UInt64, count: Int, chunkLength: Int)? {
        guard input.readableBytes == 0, queued.isEmpty, case .data(let cookie, let offset, let remaining, let length, _) = parseState
        else { return nil }
        return (inFlight[cookie]!.context, offset, remaining, length)
    }

    /// `count` bytes of the ``expectedData`` were read by the caller, not fed. Follow with
    /// ``next()``: the request completes there when these were its last bytes.
    @inlinable public mutating func dataReadDirectly(_ count: Int) {
        guard input.readableBytes == 0, case .data(_, _, let remaining, _, _) = parseState, count <= remaining else {
            preconditionFailure("dataReadDirectly(\(count)) without that much expected data")
        }
        do {
            try passData(count)
        } catch {
            let failure = fail(error)
            outbox.append(failure)
        }
    }

    /// Moves past `count` bytes of the data being streamed (fed or read directly); after the
    /// last byte of a chunk flagged done, queues the request's completion.
    @inlinable mutating func passData(_ count: Int) throws(NBDError) {
        guard case .data(let cookie, let offset, let remaining, let length, let done) = parseState else { return }
        if count < remaining {
            parseState = .data(cookie: cookie, offset: offset + UInt64(count), remaining: remaining - count, length: length, done: done)
        } else {
            parseState = .header
            if done { outbox.append(try finish(cookie)) }
        }
    }

    /// How many bytes were fed and are not parsed yet (part of a header, say).
    @inlinable public var unparsedByteCount: Int { queued.reduce(input.readableBytes) { $0 + $1.readableBytes } }

    /// Removes the bytes fed and not parsed yet, for a caller that reads the socket itself:
    /// it puts them in front of the bytes it reads next and feeds them all, so that a header
    /// split between two reads is whole without copying the second read.
    @inlinable public mutating func takeUnparsed() -> ByteBuffer {
        while var next = queued.popFirst() { input.writeBuffer(&next) }
        defer { input = ByteBuffer() }
        return input
    }

    /// The connection ended: every request in flight fails with `error`.
    @inlinable public mutating func connectionClosed(_ error: NBDError) -> Action? {
        guard !hasFailed else { return nil }
        return fail(error)
    }

    /// The next thing to do with what was fed, or nil when more bytes are needed.
    @inlinable public mutating func next() -> Action? {
        if let action = outbox.next() { return action }
        do {
            repeat {
                if let action = try parse() { return action }
            } while refill()
            input.releaseIfRead()
            return nil
        } catch {
            return fail(error)
        }
    }

    @inlinable mutating func fail(_ error: NBDError) -> Action {
        parseState = .failed
        input = ByteBuffer()
        queued = CircularBuffer()
        outbox.removeAll()
        let contexts = inFlight.values.map(\.context)
        inFlight = [:]
        return .fatal(error, contexts)
    }

    @inlinable mutating func parse() throws(NBDError) -> Action? {
        switch parseState {
        case .failed:
            return nil
        case .data(let cookie, let offset, let remaining, _, _):
            guard input.readableBytes > 0 else { return nil }
            let count = min(remaining, input.readableBytes)
            let bytes = input.readSlice(length: count)!
            let context = inFlight[cookie]!.context
            try passData(count)
            return .data(context, offset: offset, bytes: bytes)
        case .header:
            return try parseReply()
        }
    }

    @inlinable mutating func parseReply() throws(NBDError) -> Action? {
        let start = input.readerIndex
        guard let header = try ReplyHeader.decode(from: &input, format: configuration.format) else { return nil }
        guard var request = inFlight[header.cookie] else {
            throw .serverViolation("reply with cookie \(header.cookie), which matches no request in flight")
        }
        let chunk: (flags: ReplyFlags, type: ReplyChunkType, cookie: NBDCookie, length: UInt64)
        switch header {
        case .simple(let simple):
            return try simpleReply(simple, request: request)
        case .structured(let structured):
            chunk = (structured.flags, structured.type, structured.cookie, UInt64(structured.length))
        case .extended(let extended):
            // "The extended reply has an additional field *offset* which MUST match the
            // *offset* of the client's request."
            guard extended.offset == request.header.offset else {
                throw .serverViolation(
                    "extended reply chunk at offset \(extended.offset) for \(request.header.type) at offset \(request.header.offset)"
                )
            }
            chunk = (extended.flags, extended.type, extended.cookie, extended.length)
        }
        if chunk.type == .offsetData {
            guard request.header.type == .read else {
                throw .serverViolation("NBD_REPLY_TYPE_OFFSET_DATA in reply to \(request.header.type)")
            }
            guard chunk.length >= 9 else {
                throw .serverViolation("NBD_REPLY_TYPE_OFFSET_DATA with length \(chunk.length), MUST be at least 9")
            }
            guard let offset = input.readInteger(as: UInt64.self) else {
                input.moveReaderIndex(to: start)
                return nil
            }
            let length = chunk.length - 8
            // Within the request, which is no longer than a READ's buffer: it fits in an Int.
            try recordContent(&request, offset: offset, length: length, kind: "NBD_REPLY_TYPE_OFFSET_DATA")
            inFlight[chunk.cookie] = request
            parseState = .data(
                cookie: chunk.cookie,
                offset: offset,
                remaining: Int(length),
                length: Int(length),
                done: chunk.flags.contains(.done)
            )
            return try parse()
        }
        guard chunk.length <= UInt64(configuration.maximumBufferedChunkLength) else {
            throw .serverViolation(
                "\(chunk.type) chunk of \(chunk.length) bytes exceeds the bound of \(configuration.maximumBufferedChunkLength)"
            )
        }
        guard var payload = input.readSlice(length: Int(chunk.length)) else {
            input.moveReaderIndex(to: start)
            return nil
        }
        let body = try ReplyChunk.decode(type: chunk.type, payload: &payload)
        let action = try structuredChunk(body, request: &request)
        inFlight[chunk.cookie] = request
        if chunk.flags.contains(.done) {
            let completion = try finish(chunk.cookie)
            guard let action else { return completion }
            outbox.append(completion)
            return action
        }
        if case .none = body { throw .serverViolation("NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE") }
        if let action { return action }
        return try parse()
    }

    @inlinable mutating func simpleReply(_ reply: SimpleReplyHeader, request: InFlight) throws(NBDError) -> Action? {
        let cookie = reply.cookie
        if reply.error.rawValue != 0 {
            inFlight[cookie]!.error = Self.serverError(reply.error, message: nil, request: request.header)
            return try finish(cookie)
        }
        if request.header.type == .read {
            // "MUST NOT use a simple reply for NBD_CMD_READ" once structured replies are on.
            guard !configuration.structuredReplies else {
                throw .serverViolation("successful simple reply to NBD_CMD_READ although structured replies were negotiated")
            }
            inFlight[cookie]!.coverage = RangeCoverage()
            _ = inFlight[cookie]!.coverage.insert(request.range)
            parseState = .data(
                cookie: cookie,
                offset: request.header.offset,
                remaining: Int(request.header.length),
                length: Int(request.header.length),
                done: true
            )
            return try parse()
        }
        guard request.header.type != .blockStatus else {
            throw .serverViolation("successful simple reply to NBD_CMD_BLOCK_STATUS, which needs a structured reply")
        }
        return try finish(cookie)
    }

    @inlinable mutating func structuredChunk(_ chunk: ReplyChunk, request: inout InFlight) throws(NBDError) -> Action? {
        switch chunk {
        case .none:
            return nil
        case .offsetHole(let offset, let length):
            guard request.header.type == .read else {
                throw .serverViolation("NBD_REPLY_TYPE_OFFSET_HOLE in reply to \(request.header.type)")
            }
            try recordContent(&request, offset: offset, length: UInt64(length), kind: "NBD_REPLY_TYPE_OFFSET_HOLE")
            return .hole(request.context, offset: offset, length: length)
        case .blockStatus(let contextID, let descriptors), .blockStatusExtended(let contextID, let descriptors):
            let isExtended = if case .blockStatusExtended = chunk { true } else { false }
            let type: ReplyChunkType = isExtended ? .blockStatusExtended : .blockStatus
            guard request.header.type == .blockStatus else {
                throw .serverViolation("\(type) in reply to \(request.header.type)")
            }
            // "only NBD_REPLY_TYPE_BLOCK_STATUS for structured replies, and only
            // NBD_REPLY_TYPE_BLOCK_STATUS_EXT for extended headers"
            guard isExtended == (configuration.format == .extended) else {
                throw .serverViolation("\(type) although extended headers were \(isExtended ? "not " : "")negotiated")
            }
            guard configuration.metaContextIDs.contains(contextID) else {
                throw .serverViolation("block status for metadata context id \(contextID), which was not negotiated")
            }
            guard request.contextsWanted.contains(contextID) else {
                throw .serverViolation("block status for metadata context id \(contextID), which the request filtered out")
            }
            guard request.contextsSeen.insert(contextID).inserted else {
                throw .serverViolation("two block status chunks for metadata context id \(contextID) in one reply")
            }
            if configuration.narrowStatusContextIDs.contains(contextID), descriptors.contains(where: { $0.flags > UInt32.max }) {
                throw .serverViolation("block status for context id \(contextID) sets status bits above 32, which it does not have")
            }
            if request.header.flags.contains(.requestOne) {
                // "each chunk contains exactly one descriptor where the length ... MUST NOT be greater than the length of the request"
                guard descriptors.count == 1, descriptors[0].length <= request.effectLength else {
                    throw .serverViolation("block status with NBD_CMD_FLAG_REQ_ONE must carry one extent within the request")
                }
            } else {
                // "the sum of the length fields of the first N-1 extents (if any) MUST be less than the requested length"
                var leading: UInt64 = 0
                for descriptor in descriptors.dropLast() {
                    let (sum, overflow) = leading.addingReportingOverflow(descriptor.length)
                    leading = sum
                    guard !overflow, leading < request.effectLength else {
                        throw .serverViolation("block status extents run past the requested length")
                    }
                }
                // The last one may run past the request, not past what offsets can say.
                guard UInt64.max - request.header.offset - leading >= descriptors[descriptors.count - 1].length else {
                    throw .serverViolation("block status extents run past the largest offset")
                }
            }
            return .blockStatus(request.context, contextID: contextID, descriptors: descriptors)
        case .error(_, let errno, let message, let offset):
            if let offset {
                guard request.header.type != .flush,
                    request.range.contains(offset) || (request.effectLength == 0 && offset == request.header.offset)
                else {
                    throw .serverViolation("NBD_REPLY_TYPE_ERROR_OFFSET at \(offset), outside the request")
                }
            }
            // An unknown error type still errs the reply: "it MUST consider the current reply as errored".
            if request.error == nil {
                request.error = Self.serverError(errno, message: message, request: request.header)
            }
            return nil
        }
    }

    /// Checks a content chunk ("MUST lie within the bounds of the original offset and length
    /// of the client's request, and MUST NOT overlap with the bounds of any earlier content chunk").
    @inlinable func recordContent(_ request: inout InFlight, offset: UInt64, length: UInt64, kind: String) throws(NBDError) {
        let (end, overflow) = offset.addingReportingOverflow(length)
        guard !overflow, offset >= request.range.lowerBound, end <= request.range.upperBound else {
            throw .serverViolation("\(kind) for bytes \(offset)..<\(offset &+ length), outside the request \(request.range)")
        }
        guard request.coverage.insert(offset..<end) else {
            throw .serverViolation("\(kind) for bytes \(offset)..<\(end) overlaps an earlier chunk")
        }
        request.contentChunks += 1
        if request.header.flags.contains(.dontFragment), request.contentChunks > 1 {
            throw .serverViolation("more than one content chunk although NBD_CMD_FLAG_DF was set")
        }
    }

    /// The request's last reply arrived: check it is whole, and report it.
    @inlinable mutating func finish(_ cookie: NBDCookie) throws(NBDError) -> Action {
        // Checked while still in the table, so that a violation fails this request too.
        let request = inFlight[cookie]!
        if request.error == nil {
            switch request.header.type {
            case .read where request.coverage.total != request.effectLength:
                // libnbd's EPROTO: "When no error is detected, the server MUST send enough data
                // chunks to cover the entire region".
                throw .serverViolation("read of \(request.header.length) bytes answered with only \(request.coverage.total)")
            case .blockStatus where request.contextsSeen != request.contextsWanted:
                throw .serverViolation("successful block status without a chunk for every context asked for")
            default:
                break
            }
        }
        inFlight[cookie] = nil
        return .complete(request.context, error: request.error)
    }

    /// A command the server failed, named with its range: "the server failed NBD_CMD_READ of
    /// 65536 bytes at offset 1048576", so that a log line says where the disk is bad.
    @inlinable static func serverError(_ errno: NBDErrno, message: String?, request: RequestHeader) -> NBDError {
        let range = request.type == .flush ? "" : " of \(request.length) bytes at offset \(request.offset)"
        return NBDError(
            .serverError,
            "the server failed \(request.type)\(range)",
            serverErrno: errno,
            serverMessage: message,
            connectionUsable: true
        )
    }
}

extension ClientTransmissionStateMachine: Sendable where Context: Sendable {}
extension ClientTransmissionStateMachine.InFlight: Sendable where Context: Sendable {}
extension ClientTransmissionStateMachine.ParseState: Sendable {}
extension ClientTransmissionStateMachine.Action: Sendable where Context: Sendable {}
