import NIOCore

/// The actions a machine has decided and its caller has not taken yet, in order: every machine
/// queues into one and hands them out from ``next()``. A ring buffer, so that taking the first
/// costs no shift of the rest.
@usableFromInline
struct Outbox<Action> {
    @usableFromInline var actions = CircularBuffer<Action>()

    @inlinable init() {}

    /// Queues `action` after the others.
    @inlinable mutating func append(_ action: Action) { actions.append(action) }

    /// The first action queued, taken out; nil when there is none.
    @inlinable mutating func next() -> Action? { actions.popFirst() }

    /// Whether nothing is queued.
    @inlinable var isEmpty: Bool { actions.isEmpty }

    /// Drops every action queued, as when a connection ends and only its end is left to say.
    @inlinable mutating func removeAll() { actions.removeAll(keepingCapacity: false) }

    /// Replaces everything queued with `action`.
    @inlinable mutating func replaceAll(with action: Action) {
        actions.removeAll(keepingCapacity: false)
        actions.append(action)
    }
}

extension Outbox: Sendable where Action: Sendable {}
