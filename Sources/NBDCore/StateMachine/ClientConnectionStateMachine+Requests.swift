import NIOCore

// The requests: submitted, queued under the in-flight cap, checked against the export's size,
// held around a resize, and sent.
extension ClientConnectionStateMachine {
    /// A caller submits a request: `length` is the length the command acts on (for
    /// `NBD_CMD_RESIZE`, `offset` is the new size), `onlyContexts` the ids of a block status
    /// limited to some contexts (the payload form). It is answered once, with
    /// ``Action/complete(_:error:)`` (or ``Action/cancel(_:)``).
    ///
    /// Strict mode first (libnbd's): a command or flag the export did not advertise, a zero
    /// length, a range past the end or not aligned to the minimum block size completes with
    /// an error at once, and nothing is sent (see ``RequestValidator``). Then the request goes
    /// on the wire as the protocol wants it: a READ or WRITE larger than the maximum payload in
    /// pieces; a TRIM, WRITE_ZEROES or CACHE of 4 GiB or more in pieces of under 4 GiB
    /// without extended headers, and whole with them, sent again in pieces if the server
    /// answers `EOVERFLOW` ("MAY reply with an NBD_EOVERFLOW ... error if the oversize request
    /// would require too many server resources"); a BLOCK_STATUS whole with extended
    /// headers, and for at most 4 GiB of its range without. A request in pieces completes
    /// once its last piece is answered, with the first error of any.
    ///
    /// It is sent now, or queued while the in-flight cap is reached; a request that runs past
    /// the end of the export as it is when it would go on the wire completes with an error,
    /// unsent. `NBD_CMD_RESIZE` is sent only once no request touching the bytes between the
    /// old and the new size is on the wire, and until its reply such requests wait (the
    /// extension: "Clients MUST NOT issue requests for offsets in the area between the old
    /// and new sizes between the time this request is issued and the reply has been received
    /// ... clients MUST also make sure that no such requests are outstanding when the resize
    /// request is sent"); requests submitted after it wait for it to be sent. The new size
    /// bounds every request after a successful reply.
    @inlinable public mutating func requestSubmitted(
        _ request: Request,
        command: CommandType,
        flags: CommandFlags,
        offset: UInt64,
        length: UInt64,
        onlyContexts: [UInt32]? = nil
    ) {
        guard !disconnecting, var state = takeTransmission() else {
            switch phase {
            case .closed(let error):
                outbox.append(.complete(request, error: error))
            case .negotiating, .modifying:
                outbox.append(.complete(request, error: .invalidArgument("\(command) before transmission")))
            case .transmission:
                outbox.append(
                    .complete(request, error: NBDError(.connectionClosed, "the export is disconnecting", connectionUsable: false))
                )
            }
            return
        }
        do {
            try Self.strictMode(command, flags: flags, offset: offset, length: length, onlyContexts: onlyContexts, state)
            Self.enqueue(
                Queued(request: request, command: command, flags: flags, offset: offset, length: length, onlyContexts: onlyContexts),
                &state
            )
            sendQueued(&state)
        } catch {
            outbox.append(.complete(request, error: error))
        }
        phase = .transmission(state)
    }

    /// Largest length of one request that carries no payload, without extended headers: 2^32
    /// less 64 KiB, a multiple of any minimum block size.
    public static var largestEffectLength: UInt64 { 0xFFFF_0000 }

    /// Strict mode's checks of a request before anything is sent. While a resize is under way
    /// a request may reach up to the larger of the sizes: those between the two wait for the
    /// resize's reply, and are checked again as they go on the wire.
    @inlinable static func strictMode(
        _ command: CommandType,
        flags: CommandFlags,
        offset: UInt64,
        length: UInt64,
        onlyContexts: [UInt32]?,
        _ state: Transmitting
    ) throws(NBDError) {
        if command == .resize {
            try state.validator.validateResize(to: offset)
            return
        }
        guard state.resizing != nil || state.queuedResizes > 0 else {
            try state.validator.validate(command, flags: flags, offset: offset, length: length, onlyContexts: onlyContexts)
            return
        }
        var validator = state.validator
        let targets = state.queue.lazy.filter { $0.command == .resize }.map(\.offset)
        validator.export.size = max(state.size, state.resizing?.to ?? 0, targets.max() ?? 0)
        try validator.validate(command, flags: flags, offset: offset, length: length, onlyContexts: onlyContexts)
    }

    /// Queues `request` as the protocol wants it on the wire: whole, or in pieces.
    @inlinable static func enqueue(_ request: Queued, _ state: inout Transmitting) {
        let limit: UInt64
        switch request.command {
        case .read, .write:
            limit = UInt64(state.validator.export.maximumPayload)
        case .trim, .writeZeroes, .cache:
            limit = largestEffectLength
            if state.validator.format == .extended, request.length > limit {
                // Whole, in one request: sent again in pieces after EOVERFLOW.
                state.splits[ObjectIdentifier(request.request)] = Split(remaining: 1, whole: request)
                state.queue.append(request)
                return
            }
        case .blockStatus where state.validator.format != .extended && request.length > largestEffectLength:
            // At most 4 GiB of the range: the server answers for what it can, and the caller
            // asks again from where the answer ends.
            state.queue.append(
                Queued(
                    request: request.request,
                    command: request.command,
                    flags: request.flags,
                    offset: request.offset,
                    length: largestEffectLength,
                    onlyContexts: request.onlyContexts
                )
            )
            return
        default:
            if request.command == .resize { state.queuedResizes += 1 }
            state.queue.append(request)
            return
        }
        guard request.length > limit else {
            state.queue.append(request)
            return
        }
        inPieces(request, limit: limit, &state)
    }

    /// Queues `request` in pieces of at most `limit` bytes, each with its share of a WRITE's data.
    @inlinable static func inPieces(_ request: Queued, limit: UInt64, _ state: inout Transmitting) {
        var count = 0
        var start: UInt64 = 0
        while start < request.length {
            let length = min(limit, request.length - start)
            let payload = request.command == .write ? Int(start)..<Int(start + length) : nil
            state.queue.append(
                Queued(
                    request: request.request,
                    command: request.command,
                    flags: request.flags,
                    offset: request.offset + start,
                    length: length,
                    payload: payload
                )
            )
            count += 1
            start += length
        }
        let id = ObjectIdentifier(request.request)
        if var split = state.splits[id] {
            // Sent again in pieces after EOVERFLOW: the whole one is answered.
            split.remaining += count - 1
            split.whole = nil
            state.splits[id] = split
        } else {
            state.splits[id] = Split(remaining: count)
        }
    }

    /// A piece of `request` was answered with `error`: the request's answer once it was its
    /// last piece (`.some(nil)` for success), nil while pieces are left. A whole TRIM,
    /// WRITE_ZEROES or CACHE the server found too large goes again in pieces.
    @inlinable static func pieceAnswered(_ request: Request, _ error: NBDError?, _ state: inout Transmitting) -> NBDError?? {
        let id = ObjectIdentifier(request)
        guard var split = state.splits[id] else { return .some(error) }
        if let whole = split.whole, error?.serverErrno == .EOVERFLOW {
            inPieces(whole, limit: largestEffectLength, &state)
            return nil
        }
        split.remaining -= 1
        if split.error == nil { split.error = error }
        guard split.remaining > 0 else {
            state.splits[id] = nil
            return .some(split.error)
        }
        state.splits[id] = split
        return nil
    }

    /// The caller of `request` stopped waiting: its pieces not yet sent are dropped.
    public mutating func requestCancelled(_ request: Request) {
        if case .transmission(let current) = phase, current.queue.contains(where: { $0.request === request }),
            var state = takeTransmission()
        {
            let dropped = state.queue.filter { $0.request === request }
            state.queue.removeAll { $0.request === request }
            state.queuedResizes -= dropped.count { $0.command == .resize }
            let id = ObjectIdentifier(request)
            if var split = state.splits[id] {
                split.remaining -= dropped.count
                state.splits[id] = split.remaining > 0 ? split : nil
            }
            // What waited behind a resize may go now.
            sendQueued(&state)
            phase = .transmission(state)
        } else if case .transmission(let current) = phase, current.splits[ObjectIdentifier(request)]?.whole != nil,
            var state = takeTransmission()
        {
            // A whole TRIM, WRITE_ZEROES or CACHE on the wire: an EOVERFLOW answer ends it
            // instead of sending it again in pieces. A cancelled request never goes again.
            state.splits[ObjectIdentifier(request)]?.whole = nil
            phase = .transmission(state)
        }
        outbox.append(.cancel(request))
    }

    /// Another connection to the export resized it (its client made sure nothing was on the
    /// wire here meanwhile): requests are bounded by `newSize` from now on.
    public mutating func exportResizedElsewhere(to newSize: UInt64) {
        guard var state = takeTransmission() else { return }
        state.size = newSize
        sendQueued(&state)
        phase = .transmission(state)
    }

    /// Sends what may go on the wire now, under the in-flight cap.
    @inlinable mutating func sendQueued(_ state: inout Transmitting) {
        while state.machine.inFlightCount < configuration.maximumRequestsInFlight, !state.machine.hasFailed,
            let next = Self.nextToSend(&state)
        {
            if next.command != .flush, next.command != .resize, next.offset > state.size || next.length > state.size - next.offset {
                // One piece of the request: it is answered once every other piece is.
                if let answer = Self.pieceAnswered(next.request, Self.pastTheEnd(next, size: state.size), &state) {
                    outbox.append(.complete(next.request, error: answer))
                }
                continue
            }
            if next.command == .resize {
                state.queuedResizes -= 1
                state.resizing = (next.request, state.size, next.offset)
            }
            let header = state.machine.startRequest(
                next.command,
                flags: next.flags,
                offset: next.offset,
                length: next.length,
                onlyContexts: next.onlyContexts,
                context: next.request,
                stamp: state.ticks
            )
            if state.output.writableBytes < RequestHeader.extendedSize + 8 + 4 * (next.onlyContexts?.count ?? 0) {
                // Room for a turn's worth of headers, so that they take one allocation.
                state.output.reserveCapacity(minimumWritableBytes: Self.outputCapacity)
            }
            state.machine.encode(header, into: &state.output)
            if next.command == .write {
                var bytes = ByteBuffer()
                swap(&bytes, &state.output)
                outbox.append(.sendRequest(header, bytes: bytes, next.request, payload: next.payload))
            } else {
                outbox.append(.requestBuffered(header, next.request))
            }
            if configuration.requestTimeout != nil, !state.clockRunning {
                state.clockRunning = true
                outbox.append(.armTimer(after: configuration.tick))
            }
        }
    }

    /// The room ``takeOutput()``'s buffer starts with: the headers of 64 requests with
    /// extended headers, or of 128 without.
    @usableFromInline static var outputCapacity: Int { 64 * RequestHeader.extendedSize }

    /// The queued request that may go on the wire now, taken out of the queue; nil when none
    /// may. In order, except around a resize: see
    /// ``requestSubmitted(_:command:flags:offset:length:onlyContexts:)``.
    @inlinable static func nextToSend(_ state: inout Transmitting) -> Queued? {
        guard state.resizing != nil || state.queuedResizes > 0 else { return state.queue.popFirst() }
        for index in state.queue.indices {
            let next = state.queue[index]
            if next.command == .resize {
                // After what was submitted before it, alone, and with nothing on the wire in
                // the bytes it adds or removes.
                guard index == state.queue.startIndex, state.resizing == nil else { return nil }
                let zone = min(state.size, next.offset)..<max(state.size, next.offset)
                guard !state.machine.hasRequestInFlight(touching: zone) else { return nil }
                return state.queue.remove(at: index)
            }
            if let resize = state.resizing, next.command != .flush {
                let zone = min(resize.from, resize.to)..<max(resize.from, resize.to)
                // Held back until the reply: the range is past one of the two sizes.
                if zone.overlaps(next.offset, length: next.length) { continue }
            }
            return state.queue.remove(at: index)
        }
        return nil
    }

    /// The error of a request past the end of the export.
    @usableFromInline static func pastTheEnd(_ request: Queued, size: UInt64) -> NBDError {
        .invalidArgument(
            "\(request.command) of \(request.length) bytes at offset \(request.offset) runs past the end of the export (\(size) bytes)"
        )
    }
}
