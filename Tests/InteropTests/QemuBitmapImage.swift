import Foundation
import NBD
import TestSupport

/// The incremental-backup scene the bitmap tests share: a 64 MiB qcow2 holding data (8 MiB at 0,
/// 2 MiB at 30M), served read-only for the full copy; then a dirty bitmap `b0` and the guest's
/// writes (1 MiB of new data at 10M, 512 KiB of zeroes at 31M), served with the bitmap and a
/// trace of what qemu-nbd sends.
struct QemuBitmapImage {
    let server: ServerProcess
    let path: String

    init(_ server: ServerProcess) throws {
        self.server = server
        path = server.path("disk.qcow2")
        _ = try server.run("qemu-img", ["create", "-q", "-f", "qcow2", path, "64M"])
        _ = try server.run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x11 0 8M", "-c", "write -P 0x22 30M 2M", path])
    }

    /// Serves the image as it is, for the full copy; give the process to ``dirty(after:)``.
    func serveForFullCopy() async throws -> (process: Process, uri: NBDURI) {
        let socket = server.path("full.sock")
        let process = try await server.start("qemu-nbd", ["-k", socket, "-t", "-r", "-f", "qcow2", path], waitFor: socket)
        return (process, NBDURI(socket: socket))
    }

    /// Stops the full copy's server, then adds the bitmap and makes the guest's writes.
    func dirty(after fullCopyServer: Process) async throws {
        // SIGKILL: children of Swift concurrency threads start with SIGTERM blocked. The image
        // must be free before qemu-img and qemu-io write to it.
        kill(fullCopyServer.processIdentifier, SIGKILL)
        try await fullCopyServer.exited()
        _ = try server.run("qemu-img", ["bitmap", "--add", path, "b0"])
        _ = try server.run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x77 10M 1M", "-c", "write -z 31M 512K", path])
    }

    /// Serves the image with the bitmap `b0`, tracing the reads qemu-nbd answers
    /// (``qemuBytesSent(_:)`` counts them).
    func serveWithBitmap() async throws -> (uri: NBDURI, trace: String) {
        let socket = server.path("q.sock")
        let trace = server.path("trace.log")
        try await server.start(
            "qemu-nbd",
            ["-k", socket, "-t", "-r", "-f", "qcow2", "-B", "b0", "--trace", "enable=nbd_co_send_structured_read*,file=\(trace)", path],
            waitFor: socket
        )
        return (NBDURI(socket: socket), trace)
    }
}
