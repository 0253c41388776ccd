import NIOCore

// The soft disconnects: ABORT then close while negotiating, DISC once the requests in flight
// are answered in transmission; and what is answered once the channel has closed.
extension ClientConnectionStateMachine {
    /// A soft disconnect: `NBD_OPT_ABORT` while negotiating, `NBD_CMD_DISC` once the requests
    /// in flight are answered in transmission. `waiter` (if any) is answered when the
    /// connection has closed.
    public mutating func disconnectRequested(waiter: Waiter?) {
        if case .closed = phase {
            // Answered once the channel has closed, as every disconnect is.
            if let waiter { channelIsOpen ? disconnectWaiters.append(waiter) : outbox.append(.succeed(waiter, .disconnected)) }
            return
        }
        if let waiter { disconnectWaiters.append(waiter) }
        guard !disconnecting else { return }
        disconnecting = true
        switch phase {
        case .negotiating(let state):
            if case .none = state.pending {
                // "The client MAY send NBD_OPT_ABORT ... then close", after the server's ACK.
                send(.abort, pending: .abort)
            } else {
                // Mid-exchange no option may be sent: the only way out is to close.
                outbox.append(.close)
            }
        case .transmission:
            disconnectIfIdle()
        case .closed, .modifying:
            break
        }
    }

    /// The channel closed. Everything still waiting fails with the reason the connection
    /// ended; callers of a disconnect are answered.
    public mutating func channelClosed() {
        channelIsOpen = false
        switch phase {
        case .closed, .modifying:
            break
        case .negotiating(let state):
            if case .option(.exportName(let name), _)? = state.pending {
                // The only answer EXPORT_NAME has for an export the server will not serve.
                let message = "the server closed the connection after NBD_OPT_EXPORT_NAME \"\(name)\" (no such export, or it is refused)"
                end(NBDError(.connectionClosed, message, connectionUsable: false))
            } else {
                end(NBDError(.connectionClosed, "the server closed the connection", connectionUsable: false))
            }
        case .transmission:
            end(NBDError(.connectionClosed, "the server closed the connection", connectionUsable: false))
        }
        for waiter in disconnectWaiters { outbox.append(.succeed(waiter, .disconnected)) }
        disconnectWaiters = []
    }

    /// Sends `NBD_CMD_DISC` once a disconnect is asked for and no request is left.
    @inlinable mutating func disconnectIfIdle() {
        guard disconnecting, case .transmission(let current) = phase, current.machine.inFlightCount == 0, current.queue.isEmpty,
            let state = takeTransmission()
        else { return }
        // Nothing is in flight: the output is empty, but would go first all the same.
        var bytes = state.output
        state.machine.encode(RequestHeader(type: .disconnect, cookie: 0, offset: 0, length: 0), into: &bytes)
        // "A client MUST NOT send anything to the server after sending an NBD_CMD_DISC command."
        phase = .closed(NBDError(.connectionClosed, "the export was disconnected", connectionUsable: false))
        outbox.append(.sendDisconnect(bytes))
    }
}
