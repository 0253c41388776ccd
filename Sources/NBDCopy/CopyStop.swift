import NIOConcurrencyHelpers

/// Asks a copy to stop early and cleanly: the pieces in flight are finished (and recorded in
/// a resumable copy's journal), no new ones are started, and the copy returns. Cancelling the
/// copy's task instead stops it at once, requests in flight abandoned.
///
/// The `nbd` tool requests it at the first Ctrl-C.
public final class CopyStop: Sendable {
    private let requested = NIOLockedValueBox(false)

    public init() {}

    /// Asks the copy to stop after what is in flight. Returns whether it had been asked before.
    @discardableResult
    public func request() -> Bool {
        requested.withLockedValue { requested in
            defer { requested = true }
            return requested
        }
    }

    /// Whether a stop was asked for.
    public var isRequested: Bool { requested.withLockedValue { $0 } }
}
