import NIOCore

/// Runs tasks on one SwiftNIO event loop, so that a task waiting on a connection resumes on the
/// thread that serves it: no hop to the cooperative pool and back for each request. Used by the
/// client (``NBDExport``'s `taskExecutor`) and by the built-in server.
package final class EventLoopTaskExecutor: TaskExecutor, @unchecked Sendable {
    package let eventLoop: any EventLoop

    package init(_ eventLoop: any EventLoop) {
        self.eventLoop = eventLoop
    }

    package func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        eventLoop.execute {
            job.runSynchronously(on: self.asUnownedTaskExecutor())
        }
    }
}
