@_spi(NBDMachines) import NBDCore
import NBDSystem
import NIOCore
import NIOPosix

/// A server started for this program by systemd socket activation, as libnbd's
/// `nbd_connect_systemd_socket_activation` and its tools' `[ CMD ARGS ]` do: the command gets a
/// Unix socket listening in a private folder as descriptor 3, with `LISTEN_FDS=1` and
/// `LISTEN_PID` naming it; qemu-nbd, nbdkit and `nbd serve` all take that.
///
/// Connect to ``uri`` as often as you like (``NBDClient`` opens several connections when the
/// server allows multi-conn, and reconnects to it), then ``stop()`` it.
///
/// ```swift
/// let server = try NBDServerCommand(["qemu-nbd", "-f", "qcow2", "disk.qcow2"])
/// try await NBDClient.withClient(server.uri) { client in ... }
/// await server.stop()
/// ```
public final class NBDServerCommand: Sendable {
    /// The command and its arguments, as given.
    public let command: [String]
    /// The server's export: `nbd+unix:///EXPORT?socket=PATH`.
    public let uri: NBDURI
    private let process: Subprocess
    private let socket: ListeningSocket

    /// Starts `command` (its first element found on `PATH`) with a listening socket; the
    /// ``uri`` names `exportName` on it. A command that cannot start throws `connectFailed`
    /// saying why; one that starts and fails makes the first connection fail.
    public init(_ command: [String], exportName: String = "") throws {
        guard let name = command.first, !name.isEmpty else {
            throw NBDError.invalidArgument("no server command to start")
        }
        do {
            guard let executable = Self.find(name) else {
                throw Subprocess.Failure(description: "cannot start \(name): not found")
            }
            let socket = try ListeningSocket()
            defer { _ = CLibrary.close(socket.descriptor) }
            do {
                // LISTEN_PID must be the server's own pid, which only the child knows before
                // exec: a shell sets it and execs the server in its place (same pid).
                process = try Subprocess(
                    ["/bin/sh", "-c", "LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"", executable] + command.dropFirst(),
                    descriptors: [(socket.descriptor, 3)],
                    environment: ["LISTEN_FDS": "1", "LISTEN_FDNAMES": "nbd"]
                )
            } catch {
                socket.remove()
                throw error
            }
            self.socket = socket
        } catch let failure as Subprocess.Failure {
            throw NBDError(.connectFailed, failure.description, connectionUsable: false)
        }
        self.command = command
        uri = NBDURI(socket: socket.path, exportName: exportName)
    }

    /// The server's exit status once it has ended by itself (nil while it runs): a
    /// connection that failed can say why.
    public var exitStatus: Int32? {
        process.exitStatus().map { status in status & 0x7f == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f) }
    }

    /// Stops the server (SIGTERM; SIGKILL if it has not ended 5 seconds later) and removes its
    /// socket. Connections to it end.
    public func stop() async {
        let process = self.process
        _ = try? await NIOThreadPool.singleton.runIfActive { process.stop() }
        socket.remove()
    }

    /// `name` as the shell finds it: itself when it holds a `/`, otherwise the first executable
    /// of that name on `PATH`.
    private static func find(_ name: String) -> String? {
        if name.contains("/") { return access(name, X_OK) == 0 ? name : nil }
        let path = getenv("PATH").map { String(cString: $0) } ?? "/usr/local/bin:/usr/bin:/bin"
        for folder in path.split(separator: ":", omittingEmptySubsequences: false) {
            let candidate = (folder.isEmpty ? "." : String(folder)) + "/" + name
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }
}
