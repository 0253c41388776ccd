import NIOCore

// The requests: submitted, queued under the in-flight cap, checked against the export's size,
// held around a resize, and sent.
extension ClientConnectionStateMachine {
    /// A caller submits a request. It is sent now, or queued while the in-flight cap is reached.
    /// `length` is the length the command acts on; see
    /// ``ClientTransmissionStateMachine/startRequest(_:flags:offset:length:onlyContexts:context:stamp:)``
    /// for `onlyContexts`. A request that runs past the end of the export as it is when the
    /// request would go on the wire completes with an error, unsent.
    ///
    /// `NBD_CMD_RESIZE` (the new size in `offset`) is sent only once no request touching the
    /// bytes between the old and the new size is on the wire, and until its reply such requests
    /// wait (the extension: "Clients MUST NOT issue requests for offsets in the area between the
    /// old and new sizes between the time this request is issued and the reply has been received
    /// ... clients MUST also make sure that no such requests are outstanding when the resize
    /// request is sent"); requests submitted after it wait for it to be sent. The new size
    /// bounds every request after a successful reply.
    @inlinable package mutating func requestSubmitted(
        _ request: Request,
        command: CommandType,
        flags: CommandFlags,
        offset: UInt64,
        length: UInt64,
        onlyContexts: [UInt32]? = nil
    ) {
        switch phase {
        case .closed(let error):
            outbox.append(.complete(request, error: error))
        case .negotiating, .modifying:
            outbox.append(.complete(request, error: .invalidArgument("\(command) before transmission")))
        case .transmission(var state):
            guard !disconnecting else {
                outbox.append(
                    .complete(request, error: NBDError(.connectionClosed, "the export is disconnecting", connectionUsable: false))
                )
                return
            }
            phase = .modifying
            state.queue.append(
                Queued(request: request, command: command, flags: flags, offset: offset, length: length, onlyContexts: onlyContexts)
            )
            if command == .resize { state.queuedResizes += 1 }
            sendQueued(&state)
            phase = .transmission(state)
        }
    }

    /// The caller of `request` stopped waiting.
    package mutating func requestCancelled(_ request: Request) {
        if case .transmission(var state) = phase, let index = state.queue.firstIndex(where: { $0.request === request }) {
            phase = .modifying
            if state.queue.remove(at: index).command == .resize { state.queuedResizes -= 1 }
            // What waited behind a resize may go now.
            sendQueued(&state)
            phase = .transmission(state)
        }
        outbox.append(.cancel(request))
    }

    /// Another connection to the export resized it (its client made sure nothing was on the
    /// wire here meanwhile): requests are bounded by `newSize` from now on.
    package mutating func exportResizedElsewhere(to newSize: UInt64) {
        guard case .transmission(var state) = phase else { return }
        phase = .modifying
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
                outbox.append(.complete(next.request, error: Self.pastTheEnd(next, size: state.size)))
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
            var bytes = ByteBuffer()
            bytes.reserveCapacity(RequestHeader.extendedSize + 8 + 4 * (next.onlyContexts?.count ?? 0))
            state.machine.encode(header, into: &bytes)
            outbox.append(.sendRequest(header, bytes: bytes, next.request))
            if configuration.requestTimeout != nil, !state.clockRunning {
                state.clockRunning = true
                outbox.append(.armTimer(after: configuration.tick))
            }
        }
    }

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
