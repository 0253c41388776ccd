import NIOCore

extension EventLoop {
    /// Runs `work` on this event loop: at once when already there (a task on its
    /// ``EventLoopTaskExecutor``), else as soon as the loop gets to it.
    @inlinable package func runOnLoop(_ work: @escaping @Sendable () -> Void) {
        if inEventLoop {
            work()
        } else {
            execute(work)
        }
    }
}
