import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A server started for a connection (libnbd's `nbd_connect_command` and
/// `nbd_connect_systemd_socket_activation`): spawned with some of this process's descriptors
/// in place, and stopped with SIGTERM when the connection is done with it.
package final class Subprocess: Sendable {
    /// The process id.
    package let pid: pid_t
    /// The command, for messages.
    package let name: String
    /// The wait status once the process is reaped. Its pid may then be another process's, so
    /// nothing is signalled after that; the lock keeps a reap and a signal from crossing.
    private let reaped = Mutex<CInt?>(nil)

    /// Why a command could not start, in words.
    package struct Failure: Error, CustomStringConvertible {
        package var description: String
        package init(description: String) { self.description = description }
    }

    /// Starts `arguments` (the first found on `PATH`, as a shell would), with `descriptors`
    /// given as (this process's descriptor, the child's number) and `environment` added to
    /// this process's. Signals start with their default handling and none blocked, whatever
    /// this process (or the thread calling) does with them.
    package init(_ arguments: [String], descriptors: [(CInt, CInt)], environment: [String: String] = [:]) throws(Failure) {
        guard let command = arguments.first, !command.isEmpty else { throw Failure(description: "no command to start") }
        name = command
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for (source, target) in descriptors {
            // The copy is inherited: glibc clears FD_CLOEXEC even when the numbers are the same.
            posix_spawn_file_actions_adddup2(&actions, source, target)
        }
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var none = sigset_t()
        sigemptyset(&none)
        posix_spawnattr_setsigmask(&attributes, &none)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for signal in [SIGPIPE, SIGTERM, SIGINT, SIGHUP] { sigaddset(&defaults, signal) }
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        var variables: [String] = []
        var index = 0
        while let entry = environ[index] {
            let text = String(cString: entry)
            if let key = text.split(separator: "=", maxSplits: 1).first, environment[String(key)] == nil { variables.append(text) }
            index += 1
        }
        variables += environment.map { "\($0.key)=\($0.value)" }
        let argv = arguments.map { strdup($0) } + [nil]
        let envp = variables.map { strdup($0) } + [nil]
        defer { for pointer in argv + envp { free(pointer) } }
        var pid: pid_t = 0
        let status = posix_spawnp(&pid, command, &actions, &attributes, argv, envp)
        guard status == 0 else {
            throw Failure(description: "cannot start \(command): \(CLibrary.errorText(status))")
        }
        self.pid = pid
    }

    /// The exit status when the process has ended (reaping it), nil while it runs.
    package func exitStatus() -> CInt? {
        reaped.withLock { reaped in
            if reaped == nil {
                var status: CInt = 0
                if waitpid(pid, &status, WNOHANG) == pid { reaped = status }
            }
            return reaped
        }
    }

    /// Sends SIGTERM, waits up to `grace` seconds for the process to end, then SIGKILL; reaps
    /// it either way. A process already reaped is not signalled: returns whether one was sent.
    /// Blocks: call it off an event loop.
    @discardableResult
    package func stop(grace: Double = 5) -> Bool {
        reaped.withLock { reaped in
            guard reaped == nil else { return false }
            _ = kill(pid, SIGTERM)
            var status: CInt = 0
            let deadline = Double(time(nil)) + grace
            while waitpid(pid, &status, WNOHANG) == 0 {
                guard Double(time(nil)) <= deadline else {
                    _ = kill(pid, SIGKILL)
                    _ = waitpid(pid, &status, 0)
                    break
                }
                usleep(10_000)
            }
            reaped = status
            return true
        }
    }

    /// A connected pair of stream sockets, both close-on-exec.
    package static func socketPair() throws(Failure) -> (CInt, CInt) {
        var pair: [CInt] = [-1, -1]
        guard socketpair(AF_UNIX, CLibrary.socketStream, 0, &pair) == 0 else {
            throw Failure(description: "socketpair: \(CLibrary.errorText(errno))")
        }
        for fd in pair { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        return (pair[0], pair[1])
    }
}
