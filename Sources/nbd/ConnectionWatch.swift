import NBD
import NIOConcurrencyHelpers

/// What the NBD connections of a command are doing, for its progress display: whether any is
/// lost and being dialled again (`--reconnect-delay`), from the clients' events.
final class ConnectionWatch: Sendable {
    /// A connection of one endpoint's client.
    private struct Connection: Hashable {
        var endpoint: String
        var number: Int
    }

    private struct State {
        var lost: Set<Connection> = []
        var onChange: (@Sendable () -> Void)?
    }

    private let state = NIOLockedValueBox(State())

    /// The event handler of an endpoint nobody watches.
    static let ignore: @Sendable (NBDClientEvent) -> Void = { _ in }

    /// True while a connection is lost and being dialled again.
    var reconnecting: Bool { state.withLockedValue { !$0.lost.isEmpty } }

    /// Called whenever ``reconnecting`` may have changed (the progress display redraws).
    func onChange(_ body: @escaping @Sendable () -> Void) {
        state.withLockedValue { $0.onChange = body }
    }

    /// The event handler for the client of `endpoint` (a name that tells the endpoints apart).
    func listener(for endpoint: String) -> @Sendable (NBDClientEvent) -> Void {
        { event in
            let changed = self.state.withLockedValue { state -> (@Sendable () -> Void)? in
                switch event {
                case .lost(let number, _): state.lost.insert(Connection(endpoint: endpoint, number: number))
                case .reconnected(let number, _, _): state.lost.remove(Connection(endpoint: endpoint, number: number))
                // Given up (one connection, or the client): nothing of this endpoint is coming back.
                case .gaveUp, .fewerConnections: state.lost = state.lost.filter { $0.endpoint != endpoint }
                case .connected, .replayed: return nil
                }
                return state.onChange
            }
            changed?()
        }
    }
}
