#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A Unix socket listening in a private folder of its own, for a server started with systemd
/// socket activation: the server gets the descriptor, clients the path.
package struct ListeningSocket: Sendable {
    /// The socket's path.
    package let path: String
    /// The folder that holds it (mode 0700), removed with it.
    package let folder: String
    /// The listening descriptor (close-on-exec).
    package let descriptor: CInt

    /// A socket listening at `sock` in a new folder under `TMPDIR` (or `/tmp`).
    package init() throws(Subprocess.Failure) {
        var base = getenv("TMPDIR").map { String(cString: $0) } ?? "/tmp"
        // sun_path holds 108 bytes: a long TMPDIR would not leave room.
        if base.isEmpty || base.utf8.count > 64 { base = "/tmp" }
        var template = Array((base + "/nbd-XXXXXX").utf8CString)
        guard let made = mkdtemp(&template) else {
            throw Subprocess.Failure(description: "cannot make a folder for the server's socket in \(base): \(CLibrary.errorText(errno))")
        }
        folder = String(cString: made)
        path = folder + "/sock"
        let fd = socket(AF_UNIX, CLibrary.socketStream, 0)
        guard fd >= 0 else {
            rmdir(folder)
            throw Subprocess.Failure(description: "socket: \(CLibrary.errorText(errno))")
        }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8) + [0]
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes) }
        let bound = withUnsafeBytes(of: &address) { raw in
            bind(fd, raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t(MemoryLayout<sockaddr_un>.size)) == 0
                && listen(fd, 128) == 0
        }
        guard bound else {
            let code = errno
            _ = CLibrary.close(fd)
            unlink(path)
            rmdir(folder)
            throw Subprocess.Failure(description: "cannot listen on \(path): \(CLibrary.errorText(code))")
        }
        descriptor = fd
    }

    /// Removes the socket and its folder (the descriptor is the caller's to close).
    package func remove() {
        unlink(path)
        rmdir(folder)
    }
}
