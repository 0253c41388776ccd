import ServiceLifecycle

#if canImport(Glibc)
import Glibc
#endif

/// `--exit-with-parent`: ends (and with it, gracefully, the service group) once the process
/// that started this one has exited, as nbdkit does where PR_SET_PDEATHSIG is not at hand
/// (prctl is variadic and cannot be called from Swift): the parent process id changes when the
/// parent is gone. Checked twice a second.
struct ParentWatch: Service {
    private let parent = getppid()

    func run() async throws {
        // Cut short by the group's graceful shutdown (SIGTERM): then nothing is wrong.
        try? await cancelWhenGracefulShutdown {
            while getppid() == parent {
                try await Task.sleep(for: .milliseconds(500))
            }
        }
    }
}
