import Foundation
import NBD

#if canImport(Glibc)
import Glibc
#endif

/// The nbdkit servers of one benchmark, each on a Unix socket in a folder of the benchmark's
/// own; ``stop()`` kills them and removes the folder.
final class NBDKitServers {
    let directory: URL
    private var processes: [Process] = []

    init() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("nbd-bench-\(getpid())")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    }

    /// Starts `nbdkit ARGUMENTS` on the socket `NAME.sock`, once it is there.
    func serve(_ name: String, _ arguments: [String]) async throws -> NBDURI {
        let socket = directory.appendingPathComponent("\(name).sock").path
        processes.append(try await Benchmark.startNBDKit(socket: socket, arguments))
        return NBDURI(socket: socket)
    }

    func stop() {
        for process in processes { kill(process.processIdentifier, SIGKILL) }
        processes = []
        try? FileManager.default.removeItem(at: directory)
    }
}
