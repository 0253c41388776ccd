// The request clock of `requestTimeout`: it ticks only while requests are on the wire, and the
// oldest one unanswered for longer than the timeout closes the connection.
extension ClientConnectionStateMachine {
    /// The armed deadline passed: a tick of the request clock in transmission, a negotiation
    /// step's deadline before.
    public mutating func timerFired() {
        guard case .transmission(let running) = phase, running.clockRunning, var state = takeTransmission() else {
            negotiationTimerFired()
            return
        }
        let timeout = tickRequestClock(&state)
        phase = .transmission(state)
        if let timeout { fail(timeout) }
    }

    /// One tick: the oldest request on the wire has had its time (the error to end with), or
    /// the clock goes on while any request is there.
    mutating func tickRequestClock(_ state: inout Transmitting) -> NBDError? {
        state.ticks += 1
        guard let (oldest, stamp) = state.machine.oldestInFlight else {
            state.clockRunning = false
            return nil
        }
        guard state.ticks - stamp > configuration.ticksPerRequestTimeout else {
            outbox.append(.armTimer(after: configuration.tick))
            return nil
        }
        state.clockRunning = false
        let timeout = (configuration.requestTimeout ?? .zero).secondsText
        let what = "the server did not answer \(oldest.type) at offset \(oldest.offset) within \(timeout)"
        return NBDError(.timedOut, what + "; the connection was closed", connectionUsable: false)
    }
}
