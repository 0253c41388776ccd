/// The requests of one connection, run in a task group that belongs to the connection: each
/// request is a child task, on the connection's event loop, so that a fast backend answers
/// without a thread hop; the group ends, after its last request, once the connection has.
/// No request task outlives its connection's group, and the server waits for every group
/// (``RequestGroups``) before its stop returns.
final class ConnectionRequests: Sendable {
    typealias Work = @Sendable () async -> Void

    private let continuation: AsyncStream<Work>.Continuation
    /// The group's task: done once the connection ended and its requests did.
    let runner: Task<Void, Never>

    init(executor: (any TaskExecutor)?, countedIn groups: RequestGroups) {
        let (stream, continuation) = AsyncStream<Work>.makeStream()
        self.continuation = continuation
        groups.started()
        runner = Task(executorPreference: executor) {
            await withDiscardingTaskGroup { group in
                for await work in stream {
                    group.addTask(executorPreference: executor) { await work() }
                }
            }
            groups.ended()
        }
    }

    /// Runs `work` as a child of the connection's group.
    func submit(_ work: @escaping Work) {
        continuation.yield(work)
    }

    /// No more requests: the group ends once those running have.
    func finish() {
        continuation.finish()
    }
}
