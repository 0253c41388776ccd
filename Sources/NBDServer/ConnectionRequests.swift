import NIOConcurrencyHelpers

/// The requests of one connection, run in a task group that belongs to the connection: each
/// request is a child task, on the connection's event loop, so that a fast backend answers
/// without a thread hop; the group ends, after its last request, once the connection has.
/// No request task outlives its connection's group, and the server waits for every group
/// (``RequestGroups``) before its stop returns.
///
/// The group takes the requests submitted since it last looked all at once: a batch of
/// requests read in one go wakes it once, not once each (an `AsyncStream` cost a
/// continuation and a lock per request).
final class ConnectionRequests: Sendable {
    typealias Work = @Sendable () async -> Void

    private struct Queue {
        var works: [Work] = []
        var finished = false
        /// The group's wait for work, when it has none.
        var waiter: UnsafeContinuation<[Work]?, Never>?

        /// What the group gets now: the works queued, all of them, or nil (`.some(nil)`) once
        /// finished and empty; nil when it must wait.
        mutating func take() -> [Work]?? {
            if !works.isEmpty {
                defer { works.removeAll(keepingCapacity: true) }
                return .some(works)
            }
            return finished ? .some(nil) : nil
        }
    }
    private let queue = NIOLockedValueBox(Queue())
    /// The group's task: done once the connection ended and its requests did.
    let runner: Task<Void, Never>

    init(executor: (any TaskExecutor)?, countedIn groups: RequestGroups) {
        groups.started()
        let queue = self.queue
        runner = Task(executorPreference: executor) {
            await withDiscardingTaskGroup { group in
                while let works = await Self.next(from: queue) {
                    // Children inherit the group's executor preference: none to record each.
                    for work in works { group.addTask { await work() } }
                }
            }
            groups.ended()
        }
    }

    /// The works queued, all of them; nil once finished and empty.
    private static func next(from queue: NIOLockedValueBox<Queue>) async -> [Work]? {
        if let taken = queue.withLockedValue({ $0.take() }) { return taken }
        return await withUnsafeContinuation { continuation in
            let ready = queue.withLockedValue { queue -> [Work]?? in
                // Looked at again under the lock: a submit may have come in between.
                guard let taken = queue.take() else {
                    queue.waiter = continuation
                    return nil
                }
                return taken
            }
            if let ready { continuation.resume(returning: ready) }
        }
    }

    /// Runs `work` as a child of the connection's group.
    func submit(_ work: @escaping Work) {
        let waiter = queue.withLockedValue { queue -> UnsafeContinuation<[Work]?, Never>? in
            guard let waiter = queue.waiter else {
                queue.works.append(work)
                return nil
            }
            queue.waiter = nil
            return waiter
        }
        waiter?.resume(returning: [work])
    }

    /// No more requests: the group ends once those running have.
    func finish() {
        let waiter = queue.withLockedValue { queue -> UnsafeContinuation<[Work]?, Never>? in
            queue.finished = true
            defer { queue.waiter = nil }
            return queue.waiter
        }
        waiter?.resume(returning: nil)
    }
}
