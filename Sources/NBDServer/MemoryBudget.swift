@_spi(NBDMachines) import NBDCore
import NIOConcurrencyHelpers

/// The server-wide memory budget (``NBDServer/Configuration/memoryBudget``), shared by every
/// connection: the ``MemoryBudgetLedger`` behind a lock, and the wake-up of each connection
/// whose reservation waits.
final class MemoryBudget: Sendable {
    typealias Holder = MemoryBudgetLedger.Holder
    private struct State {
        var ledger: MemoryBudgetLedger
        var wakes: [Holder: @Sendable () -> Void] = [:]
        var lastHolder = 0
    }
    private let state: NIOLockedValueBox<State>
    /// What a connection asks for at a time and may keep unused: at most 256 KiB, and within
    /// its guaranteed part, so that keeping it takes nothing from the others.
    let credit: Int

    /// A budget of `capacity` bytes for at most `holders` connections at once.
    init(capacity: Int, holders: Int) {
        let ledger = MemoryBudgetLedger(capacity: capacity, holders: holders)
        credit = min(256 << 10, ledger.floor)
        state = NIOLockedValueBox(State(ledger: ledger))
    }

    /// A number for a new connection.
    func newHolder() -> Holder {
        state.withLockedValue { state in
            state.lastHolder += 1
            return state.lastHolder
        }
    }

    /// The most held at once so far.
    var peak: Int { state.withLockedValue { $0.ledger.peak } }

    /// The bytes held now.
    var total: Int { state.withLockedValue { $0.ledger.total } }

    /// Asks for `amount` bytes for `holder`: true when granted now; otherwise `wake` is called,
    /// once, when they are granted (from the thread that freed them: hop as needed).
    func reserve(_ holder: Holder, _ amount: Int, wake: @escaping @Sendable () -> Void) -> Bool {
        state.withLockedValue { state in
            guard state.ledger.reserve(holder, amount) else {
                state.wakes[holder] = wake
                return false
            }
            return true
        }
    }

    /// `holder` holds `delta` bytes more (fewer, when negative); wakes those it lets go on.
    func adjust(_ holder: Holder, by delta: Int) {
        let wakes = state.withLockedValue { state in
            state.ledger.adjust(holder, by: delta).compactMap { state.wakes.removeValue(forKey: $0) }
        }
        for wake in wakes { wake() }
    }
}
