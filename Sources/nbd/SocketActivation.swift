import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// systemd's socket activation (sd_listen_fds(3)): the listening socket this process was
/// started with, as descriptor 3, when `LISTEN_PID` names this process and `LISTEN_FDS` is at
/// least 1. The variables are then removed, so that children do not take the socket too.
enum SocketActivation {
    /// `SD_LISTEN_FDS_START`.
    static let firstDescriptor: CInt = 3

    /// The socket, once: nil when the process was not socket-activated.
    static func take() -> CInt? {
        let environment = ProcessInfo.processInfo.environment
        defer {
            for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] { unsetenv(name) }
        }
        guard let pid = environment["LISTEN_PID"].flatMap({ Int32($0) }), pid == getpid(),
            let count = environment["LISTEN_FDS"].flatMap({ Int($0) }), count >= 1
        else { return nil }
        // Like nbdkit, the first socket is served; others are left alone.
        _ = fcntl(firstDescriptor, F_SETFD, FD_CLOEXEC)
        return firstDescriptor
    }
}
