import NIOConcurrencyHelpers

/// The request groups of the server's connections that have not ended yet, counted so that
/// the server's stop can wait for none to be left: a request's backend call may still run
/// after its client has gone, and no backend call outlives ``NBDServer/run()`` or
/// ``NBDServer/shutdown()``.
final class RequestGroups: Sendable {
    private struct State {
        var running = 0
        var waiters: [CheckedContinuation<Void, Never>] = []
    }
    private let state = NIOLockedValueBox(State())

    /// A group starts: called before its task is made, so a wait begun after cannot miss it.
    func started() {
        state.withLockedValue { $0.running += 1 }
    }

    /// A group ended: its last request returned.
    func ended() {
        let waiters = state.withLockedValue { state -> [CheckedContinuation<Void, Never>] in
            state.running -= 1
            guard state.running == 0 else { return [] }
            defer { state.waiters = [] }
            return state.waiters
        }
        for waiter in waiters { waiter.resume() }
    }

    /// Returns once no group is running.
    func allEnded() async {
        await withCheckedContinuation { continuation in
            let idle = state.withLockedValue { state in
                if state.running == 0 { return true }
                state.waiters.append(continuation)
                return false
            }
            if idle { continuation.resume() }
        }
    }
}
