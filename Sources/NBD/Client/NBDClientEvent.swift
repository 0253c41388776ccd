@_spi(NBDMachines) import NBDCore

/// What happened to an ``NBDClient``'s connections, in order: see ``NBDClient/events``.
public enum NBDClientEvent: Sendable, Equatable, CustomStringConvertible {
    /// Connection `connection` (0 is the first) is up and serving requests.
    case connected(connection: Int)
    /// Fewer connections than configured serve the export, and why: the server does not set
    /// `NBD_FLAG_CAN_MULTI_CONN`, refused or never answered the extra ones, or one could not
    /// be made again after a loss.
    case fewerConnections(connected: Int, wanted: Int, reason: String)
    /// Connection `connection` was lost; it is dialled again when reconnecting is on.
    case lost(connection: Int, cause: NBDError)
    /// Connection `connection` is back after `tries` dials and `after` since it was lost;
    /// requests that had no reply were sent again.
    case reconnected(connection: Int, tries: Int, after: Duration)
    /// After a reconnection, the `requests` writes, write-zeroes and trims (`bytes` of data)
    /// that the server had answered and not yet flushed were sent again and flushed: a server
    /// that lost them on its restart has them now. See ``NBDClient/Configuration-swift.struct/replayWindow``.
    case replayed(requests: Int, bytes: Int)
    /// The client stopped for good: every request fails with this error.
    case gaveUp(NBDError)

    public var description: String {
        switch self {
        case .connected(let connection): "connection \(connection) is up"
        case .fewerConnections(let connected, let wanted, let reason): "\(connected) of \(wanted) connections: \(reason)"
        case .lost(let connection, let cause): "connection \(connection) lost: \(cause)"
        case .reconnected(let connection, let tries, let after):
            "connection \(connection) is back after \(tries) \(tries == 1 ? "try" : "tries") and \(after.secondsText)"
        case .replayed(let requests, let bytes):
            "sent again \(requests) \(requests == 1 ? "write" : "writes") answered but not flushed before the reconnection (\(bytes) bytes)"
        case .gaveUp(let error): "gave up: \(error)"
        }
    }

    public static func == (lhs: NBDClientEvent, rhs: NBDClientEvent) -> Bool { lhs.description == rhs.description }
}
