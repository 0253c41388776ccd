import NIOCore

/// The server side of the transmission phase, without I/O.
///
/// Feed it the client's bytes with ``bytesReceived(_:)`` and take what to do with ``next()``:
/// it frames requests (a WRITE's data kept as the slices it arrived in), applies the spec's
/// checks, answers a failed check itself, and hands every valid request out to be performed.
/// Report each result with ``requestCompleted(_:_:)``: the machine frames the reply (simple,
/// or structured data, hole and error chunks). It owns the disconnect (`NBD_CMD_DISC`: finish
/// what is in flight, then close) and the shutdown (`NBD_ESHUTDOWN` for new requests).
///
/// Memory is bounded whatever the client sends: the machine counts what the connection holds
/// (WRITE data not yet stored, READ replies being made, replies not yet written to the socket)
/// and asks to stop reading the client (``Action/pauseReading``) while that reaches
/// ``Limits/maximumBufferedBytes`` or the channel is not writable, and to read again once it is
/// down to half. A client that reads none of its replies for ``Limits/replyStallTimeout`` while
/// reading is paused is closed. With ``Limits/memoryBudgetCredit``, the connection also asks a
/// server-wide budget (``MemoryBudgetLedger``) before it takes memory a client dictates: a
/// WRITE's data before it is read, a READ's reply before it is made; reading pauses until the
/// budget grants it (back-pressure, never a disconnect), and what is freed goes back.
///
/// A client that breaks the protocol gets ``Action/fatal(_:)``: a hard disconnect, and the
/// machine accepts nothing more.
@_spi(NBDMachines) public struct ServerTransmissionStateMachine: Sendable {
    /// Bounds a client must keep to.
    public struct Limits: Hashable, Sendable {
        /// Largest READ or WRITE payload (advertised with `NBD_INFO_BLOCK_SIZE`).
        public var maximumPayload: Int
        /// Requests one client may have in flight; more end its session.
        public var maximumRequestsInFlight: Int
        /// Bytes one connection may hold before its requests are no longer read: WRITE data
        /// not yet stored, READ replies being made and replies not yet written. A connection
        /// holds at most this plus one request's payload.
        public var maximumBufferedBytes: Int
        /// How long reading may stay paused with replies waiting and none of them read by the
        /// client before the connection is closed.
        public var replyStallTimeout: TimeAmount
        /// With a server-wide memory budget (``Action/reserveMemory(_:)``,
        /// ``Action/adjustMemory(by:)``), how much the connection asks of it at a time and may
        /// keep unused, so that a busy connection does not go to the budget for every request;
        /// nil without a budget.
        public var memoryBudgetCredit: Int?

        /// Limits with the given bounds.
        public init(
            maximumPayload: Int,
            maximumRequestsInFlight: Int,
            maximumBufferedBytes: Int = 64 << 20,
            replyStallTimeout: TimeAmount = .seconds(60),
            memoryBudgetCredit: Int? = nil
        ) {
            self.maximumPayload = maximumPayload
            self.maximumRequestsInFlight = maximumRequestsInFlight
            self.maximumBufferedBytes = maximumBufferedBytes
            self.replyStallTimeout = replyStallTimeout
            self.memoryBudgetCredit = memoryBudgetCredit
        }
    }

    /// What the caller does next.
    public enum Action: Sendable {
        /// Perform this request, whose checks passed, with the backend call `operation` says,
        /// and report the result with ``requestCompleted(_:_:)``.
        case perform(RequestHeader, ServerOperation)
        /// Write these buffers in order, then flush; report with ``bytesWritten(_:)`` once written.
        case write([ByteBuffer])
        /// Stop reading from the client: the connection holds as much as it may.
        case pauseReading
        /// Read from the client again.
        case resumeReading
        /// Ask the server's memory budget for this many bytes more and call ``memoryGranted()``
        /// once it gives them, now or later; until then the machine reads nothing more.
        case reserveMemory(Int)
        /// Tell the server's memory budget that the connection holds this many bytes more
        /// (fewer, when negative).
        case adjustMemory(by: Int)
        /// Call ``timerFired()`` after this long, unless cancelled first.
        case armTimer(after: TimeAmount)
        /// The timer armed last is not needed any more.
        case cancelTimer
        /// Every request is answered and the session is over (after `NBD_CMD_DISC`, or when
        /// shutting down): close the connection.
        case close
        /// The client broke the protocol: close at once, sending nothing more.
        case fatal(NBDError)
    }

    /// What negotiation agreed.
    public let agreement: ServerNegotiationStateMachine.Agreement
    private let limits: Limits
    private var input = ByteBuffer()
    /// A WRITE whose header arrived and whose data has not all arrived yet.
    private var pendingWrite: PendingWrite?
    private var outbox = Outbox<Action>()
    private var inFlight = 0
    private var disconnectReceived = false
    private var shuttingDown = false
    private var ended = false
    /// What the connection holds, in bytes: see ``Limits/maximumBufferedBytes``.
    private var held = 0
    /// What the memory budget counts for the connection: ``held`` as last reported, plus
    /// credit granted and not used yet.
    private var reported = 0
    /// Bytes asked of the budget and not granted yet; nothing is read meanwhile.
    private var memoryAsked = 0
    /// The request whose memory is asked for: it goes on once granted.
    private var awaitingMemory: RequestHeader?
    /// Reply bytes handed out to be written and not reported written yet.
    private var unwritten = 0
    /// Replies of a header alone (a WRITE's, a FLUSH's...) made since the last write action:
    /// they go out together, one buffer for many requests.
    private var shortReplies = ByteBuffer()
    private var writable = true
    private var paused = false
    /// Whether a reply was written since the stall timer was armed.
    private var wroteSinceArmed = false
    /// The export's size as last known: negotiated, then changed by `NBD_CMD_RESIZE`.
    public private(set) var exportSize: UInt64

    /// A machine for the transmission phase of `agreement`.
    public init(agreement: ServerNegotiationStateMachine.Agreement, limits: Limits) {
        self.agreement = agreement
        self.limits = limits
        self.exportSize = agreement.export.size
    }

    /// The export's size changed (a resize made on any connection): requests are checked
    /// against `size` from now on.
    public mutating func exportSizeChanged(to size: UInt64) {
        exportSize = size
    }

    /// How many requests are being performed.
    public var inFlightCount: Int { inFlight }

    /// How many bytes the connection holds now: see ``Limits/maximumBufferedBytes``.
    public var heldBytes: Int { held }

    /// Appends bytes from the client. Bytes after the end are ignored.
    public mutating func bytesReceived(_ bytes: ByteBuffer) {
        guard !ended else { return }
        input.appendReceived(bytes)
    }

    /// A request handed out by ``Action/perform(_:_:)`` finished with `reply`.
    public mutating func requestCompleted(_ request: RequestHeader, _ reply: ServerReply) {
        inFlight -= 1
        held -= Self.payloadHeld(by: request)
        guard !ended else { return }
        var reply = reply
        if request.type == .resize, case .done = reply { exportSize = request.offset }
        if request.type == .blockStatus, request.flags.contains(.requestOne), case .extents(let extents) = reply, let first = extents.first
        {
            // NBD_CMD_FLAG_REQ_ONE: "the server MUST return ... a single extent" whose length
            // "MUST NOT exceed the length of the original request".
            reply = .extents([BlockDescriptor(length: min(first.length, max(1, request.length)), flags: first.flags)])
        }
        if case .done = reply {
            let before = shortReplies.readableBytes
            ServerReply.frameDone(for: request, format: agreement.format, into: &shortReplies)
            unwritten += shortReplies.readableBytes - before
            held += shortReplies.readableBytes - before
        } else {
            let framed = reply.framed(for: request, format: agreement.format, contextID: ServerNegotiationStateMachine.baseAllocationID)
            outbox.append(write(framed))
        }
        closeIfDone()
    }

    /// The memory of the last ``Action/reserveMemory(_:)`` is the connection's: the request
    /// that waited for it goes on.
    public mutating func memoryGranted() {
        reported += memoryAsked
        memoryAsked = 0
    }

    /// The buffers of a ``Action/write(_:)`` of `count` bytes in all were written (or failed
    /// with the connection).
    public mutating func bytesWritten(_ count: Int) {
        unwritten -= count
        held -= count
        wroteSinceArmed = true
    }

    /// The channel became writable or stopped being so (its write watermarks).
    public mutating func writabilityChanged(_ isWritable: Bool) {
        writable = isWritable
    }

    /// The timer of the last ``Action/armTimer(after:)`` went off.
    public mutating func timerFired() {
        guard paused, !ended else { return }
        if unwritten > 0 && !wroteSinceArmed {
            channelClosed()
            let message = "the client read none of its replies for \(limits.replyStallTimeout.secondsText)"
            outbox.append(.fatal(NBDError(.timedOut, message, connectionUsable: false)))
            return
        }
        wroteSinceArmed = false
        outbox.append(.armTimer(after: limits.replyStallTimeout))
    }

    /// The server is stopping: requests in flight finish and are answered, new ones get
    /// `NBD_ESHUTDOWN`, then the connection closes.
    public mutating func shutdownRequested() {
        shuttingDown = true
        closeIfDone()
    }

    /// The connection is gone: nothing more is sent. What it held goes back to the memory
    /// budget as it is freed: at once for what was queued, as each call returns for requests
    /// in flight.
    public mutating func channelClosed() {
        ended = true
        input = ByteBuffer()
        if let pendingWrite { held -= memoryNeed(of: pendingWrite.header) }
        pendingWrite = nil
        awaitingMemory = nil
        unwritten -= shortReplies.readableBytes
        held -= shortReplies.readableBytes
        shortReplies = ByteBuffer()
        var kept = Outbox<Action>()
        while let action = outbox.next() {
            switch action {
            case .write(let buffers):
                let count = buffers.reduce(0) { $0 + $1.readableBytes }
                unwritten -= count
                held -= count
            case .adjustMemory: kept.append(action)
            // Not asked yet: the budget never hears of it.
            case .reserveMemory: memoryAsked = 0
            default: break
            }
        }
        outbox = kept
    }

    /// The next thing to do, or nil when more bytes (or results) are needed.
    public mutating func next() -> Action? {
        if let action = outbox.next() { return action }
        guard !ended else { return settleMemory() }
        if let change = readingChange() { return change }
        // Paused: the bytes already read wait, and the kernel holds the rest.
        guard !paused else { return shortRepliesOrSettle() }
        do {
            while let action = try parse() {
                if let action { return action }
            }
            input.releaseIfRead()
            return shortRepliesOrSettle()
        } catch {
            channelClosed()
            return .fatal(error)
        }
    }

    /// The short replies made so far, as one write, before the machine waits; then what the
    /// memory budget should learn.
    private mutating func shortRepliesOrSettle() -> Action? {
        guard shortReplies.readableBytes == 0 else { return .write([takeShortReplies()]) }
        return settleMemory()
    }

    /// The short replies made so far (already counted as held and unwritten).
    private mutating func takeShortReplies() -> ByteBuffer {
        defer { shortReplies = ByteBuffer() }
        return shortReplies
    }

    /// What the memory budget should learn now: bytes held beyond what it counts, or credit
    /// beyond ``Limits/memoryBudgetCredit`` (all of it while a reservation waits, and once
    /// the connection has ended). Nil when it is up to date enough.
    private mutating func settleMemory() -> Action? {
        guard let credit = limits.memoryBudgetCredit else { return nil }
        // Waiters keep no credit: waiters that kept it could wait for each other for ever.
        let kept = memoryAsked > 0 || ended ? 0 : credit
        guard held > reported || reported - held > kept else { return nil }
        let target = held > reported ? held : held + kept
        defer { reported = target }
        return .adjustMemory(by: target - reported)
    }

    /// Pausing at the bound, resuming at half of it (with hysteresis, as write watermarks do);
    /// paused too while the memory budget has not granted what was asked.
    private mutating func readingChange() -> Action? {
        let bound = limits.maximumBufferedBytes
        if !paused, held >= bound || !writable || memoryAsked > 0 {
            paused = true
            wroteSinceArmed = false
            outbox.append(.armTimer(after: limits.replyStallTimeout))
            return .pauseReading
        }
        if paused, held <= bound / 2, writable, memoryAsked == 0 {
            paused = false
            outbox.append(.cancelTimer)
            return .resumeReading
        }
        return nil
    }

    /// Payload bytes a request holds while it is performed: a WRITE's data, a READ's reply.
    private static func payloadHeld(by request: RequestHeader) -> Int {
        request.type == .read || request.type == .write ? Int(request.length) : 0
    }

    /// Memory a request's header commits the connection to, taken before its payload is read:
    /// the payload, and a READ's reply unless it is refused for its size (or carries a payload,
    /// which a READ may not). At most ``Limits/maximumPayload``.
    private func memoryNeed(of header: RequestHeader) -> Int {
        let payload = header.payloadLength(in: agreement.format)
        if header.type == .read, payload == 0, header.length <= UInt64(limits.maximumPayload) { return Int(header.length) }
        return Int(payload)
    }

    /// A write of `buffers`, counted until reported written.
    private mutating func write(_ buffers: [ByteBuffer]) -> Action {
        let count = buffers.reduce(0) { $0 + $1.readableBytes }
        unwritten += count
        held += count
        return .write(buffers)
    }

    /// One request framed: its action (nil when it needs none yet), or nil when more bytes are needed.
    private mutating func parse() throws(NBDError) -> Action?? {
        if let header = awaitingMemory {
            // Nothing more is read until the budget grants the memory asked for.
            guard memoryAsked == 0 else { return nil }
            awaitingMemory = nil
            return .some(receive(header))
        }
        if var pending = pendingWrite {
            pendingWrite = nil
            pending.append(input.readSlice(length: min(input.readableBytes, pending.missing))!)
            guard pending.missing == 0 else {
                pendingWrite = pending
                return nil
            }
            return .some(admit(pending.header, data: pending.segments))
        }
        let format = agreement.format
        guard let header = try RequestHeader.decode(from: &input, format: format) else { return nil }
        // "The client ... MUST NOT send any further requests" after NBD_CMD_DISC.
        if disconnectReceived { throw .clientViolation("request after NBD_CMD_DISC") }
        let payload = header.payloadLength(in: format)
        // Beyond the maximum payload the data cannot be waited for: hard disconnect ("A server
        // SHOULD initiate hard disconnect if a client sets the NBD_CMD_FLAG_PAYLOAD_LEN flag
        // and uses a length larger than a server's advertised or default maximum payload").
        guard payload <= UInt64(limits.maximumPayload) else {
            throw .clientViolation("\(header.type) payload of \(payload) bytes exceeds the maximum payload of \(limits.maximumPayload)")
        }
        return .some(take(header))
    }

    /// A request whose header is in: its memory taken (asked of the budget first, when the
    /// connection's credit does not cover it), then its payload read.
    private mutating func take(_ header: RequestHeader) -> Action? {
        let need = memoryNeed(of: header)
        if let credit = limits.memoryBudgetCredit, need > 0, held + need > reported {
            // The budget learns what is held first (credit given back, what was held without
            // asking counted), so that it is asked for the request alone, and the connection
            // holds no credit while it waits: waiters holding credit could wait for each other.
            if held != reported { outbox.append(.adjustMemory(by: held - reported)) }
            reported = held
            memoryAsked = max(need, credit)
            awaitingMemory = header
            outbox.append(.reserveMemory(memoryAsked))
            return outbox.next()
        }
        return receive(header)
    }

    /// A request whose memory is the connection's: counted as held, then its payload read.
    private mutating func receive(_ header: RequestHeader) -> Action? {
        held += memoryNeed(of: header)
        let payload = Int(header.payloadLength(in: agreement.format))
        guard payload > 0 else { return admit(header, data: []) }
        if let data = input.readSlice(length: payload) {
            // All here: handed on as a slice of what was read, without a copy.
            return admit(header, data: [data])
        }
        pendingWrite = PendingWrite(header)
        return nil
    }

    /// What a whole request leads to.
    private mutating func admit(_ request: RequestHeader, data: [ByteBuffer]) -> Action? {
        // The memory taken for the header is given back here; a request performed holds its
        // payload again below.
        held -= memoryNeed(of: request)
        var request = request
        var data = data
        if agreement.format == .extended, request.flags.contains(.payloadLength) {
            // The payload is consumed whatever it is: "in all other cases, a server SHOULD
            // gracefully consume *length* bytes of payload (even if it then replies with an
            // NBD_EINVAL failure ...)".
            request.flags.remove(.payloadLength)
            switch request.type {
            case .write:
                break
            case .blockStatus:
                guard let effectLength = filteredEffectLength(data) else {
                    return failed(request, .EINVAL, "the block status payload must name negotiated metadata contexts, each once")
                }
                request.length = effectLength
                data = []
            default:
                return failed(request, .EINVAL, "\(request.type) takes no payload")
            }
        }
        if request.type == .disconnect {
            // "The server MUST handle all outstanding requests ... and close the TCP session."
            disconnectReceived = true
            closeIfDone()
            return outbox.next()
        }
        if shuttingDown {
            // "the server ... SHOULD ... return an NBD_ESHUTDOWN error for any subsequent request"
            return failed(request, .ESHUTDOWN, "the server is shutting down")
        }
        if let (errno, message) = check(request) {
            return failed(request, errno, message)
        }
        if request.type == .cache {
            // A hint the server may ignore: answered at once, with no backend call.
            return write(ServerReply.done.framed(for: request, format: agreement.format, contextID: 0))
        }
        if request.type == .writeZeroes, request.flags.contains(.fastZero), !agreement.export.zeroIsFast {
            // "the server MUST fail quickly with NBD_ENOTSUP unless the request can be serviced
            // in less time than a corresponding NBD_CMD_WRITE"
            return failed(request, .ENOTSUP, "zeroing is not faster than writing here")
        }
        guard inFlight < limits.maximumRequestsInFlight else {
            channelClosed()
            return .fatal(.clientViolation("more than \(limits.maximumRequestsInFlight) requests in flight"))
        }
        guard let operation = operation(for: request, data: data) else {
            return failed(request, .EINVAL, "\(request.type) has no backend call")
        }
        inFlight += 1
        held += Self.payloadHeld(by: request)
        return .perform(request, operation)
    }

    /// The backend call a request that passed its checks needs; nil for a command with none,
    /// so that a command added to the checks but not here is refused, never performed as
    /// something else.
    func operation(for request: RequestHeader, data: [ByteBuffer]) -> ServerOperation? {
        // "NBD_CMD_FLAG_FUA ... the server MUST NOT send its reply until the effects of the
        // command are durable": for TRIM and WRITE_ZEROES, a flush once the call is done.
        let fua = request.flags.contains(.fua)
        switch request.type {
        case .read:
            // Holes go out as NBD_REPLY_TYPE_OFFSET_HOLE only with structured replies, and not
            // when the client asked for one data chunk (NBD_CMD_FLAG_DF).
            let sparse = agreement.structuredReplies && !request.flags.contains(.dontFragment)
            return .read(offset: request.offset, length: Int(request.length), sparse: sparse)
        case .write:
            return .write(data, offset: request.offset, fua: fua)
        case .trim:
            return .trim(offset: request.offset, length: request.length, flush: fua)
        case .writeZeroes:
            return .zero(offset: request.offset, length: request.length, noHole: request.flags.contains(.noHole), flush: fua)
        case .blockStatus:
            return .blockStatus(offset: request.offset, length: max(1, request.length))
        case .resize:
            return .resize(to: request.offset, flush: fua)
        case .flush:
            return .flush
        default:
            return nil
        }
    }

    private mutating func failed(_ request: RequestHeader, _ errno: NBDErrno, _ message: String) -> Action {
        write(ServerReply.failed(errno, message: message).framed(for: request, format: agreement.format, contextID: 0))
    }

    /// The effect length of a block status in the payload form ("C: 64 bits, effect length;
    /// C: n * 32 bits, list of metacontext ids to use"), or nil when the payload is not that,
    /// names a context that was not negotiated, or one twice ("detects duplicate or unknown
    /// metacontext ids ... MUST gracefully consume the client's payload before failing with
    /// NBD_EINVAL"), or when the form was not advertised.
    private func filteredEffectLength(_ data: [ByteBuffer]) -> UInt64? {
        guard agreement.flags.contains(.blockStatusPayload) else { return nil }
        var payload = data.count == 1 ? data[0] : data.gathered(capacity: data.reduce(0) { $0 + $1.readableBytes })
        guard payload.readableBytes >= 12, (payload.readableBytes - 8) % 4 == 0, let effectLength = payload.readInteger(as: UInt64.self)
        else { return nil }
        let known = Set(agreement.metaContexts.map(\.id))
        var seen: Set<UInt32> = []
        while let id = payload.readInteger(as: UInt32.self) {
            guard known.contains(id), seen.insert(id).inserted else { return nil }
        }
        return effectLength
    }

    private mutating func closeIfDone() {
        if (disconnectReceived || shuttingDown) && inFlight == 0 && !ended {
            // The last replies go before the close.
            if shortReplies.readableBytes > 0 { outbox.append(.write([takeShortReplies()])) }
            outbox.append(.close)
            ended = true
        }
    }

    /// The spec's checks on a request; an error value and message to answer with, or nil to go ahead.
    private func check(_ request: RequestHeader) -> (NBDErrno, String)? {
        guard let documented = request.type.documentedFlags else {
            return (.EINVAL, "unknown command \(request.type.rawValue)")
        }
        guard request.flags.isSubset(of: documented) else {
            return (.EINVAL, "flags 0x\(String(request.flags.rawValue, radix: 16)) are not valid for \(request.type)")
        }
        if request.type.modifiesExport, agreement.flags.contains(.readOnly) {
            return (.EPERM, "the export is read-only")
        }
        if request.type == .read, request.length > UInt64(limits.maximumPayload) {
            return (.EOVERFLOW, "read of \(request.length) bytes exceeds the maximum payload")
        }
        if request.type == .blockStatus, agreement.metaContexts.isEmpty {
            return (.EINVAL, "no metadata context was selected")
        }
        if request.type == .resize { return checkResize(to: request.offset) }
        if request.type != .flush {
            let (end, overflow) = request.offset.addingReportingOverflow(request.length)
            guard !overflow, end <= exportSize else {
                // "the server SHOULD return ... ENOSPC" for a write past the end, EINVAL
                // otherwise. A resizable export says ENOSPC for every command: "requests
                // beyond the new size but not beyond the old one MUST fail with ENOSPC".
                let resizable = agreement.flags.contains(.sendResize)
                let errno: NBDErrno = resizable || request.type == .write || request.type == .writeZeroes ? .ENOSPC : .EINVAL
                return (errno, "range past the end of the export (\(exportSize) bytes)")
            }
        }
        return nil
    }

    /// The checks on `NBD_CMD_RESIZE`, whose offset field is the new size.
    private func checkResize(to size: UInt64) -> (NBDErrno, String)? {
        // "EPERM: server configuration does not allow this" (the export did not advertise
        // NBD_FLAG_SEND_RESIZE, so the client broke "MUST NOT send a resize request unless").
        guard agreement.flags.contains(.sendResize) else { return (.EPERM, "this export cannot be resized") }
        // Offsets are signed 64-bit in every file system and in the spec's size checks.
        guard size <= UInt64(Int64.max) else { return (.EINVAL, "a size of \(size) bytes is too large") }
        let minimum = UInt64(agreement.export.blockSizes.minimum)
        guard size % minimum == 0 else {
            return (.EINVAL, "a size of \(size) bytes is not a multiple of the minimum block size \(minimum)")
        }
        // "ENOSPC: the resize was for an increase in space, and requires more space than is
        // available to the server": the export's maximum, checked before the backend is asked.
        if let maximum = agreement.export.maximumSize, size > maximum {
            return (.ENOSPC, "a size of \(size) bytes is over the export's maximum of \(maximum)")
        }
        return nil
    }
}
