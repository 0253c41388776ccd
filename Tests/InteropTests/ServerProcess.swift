import Foundation
import NBD
import NIOCore
import TestSupport
import Testing

/// A real NBD server (or helper) started for one test in a temporary folder, and stopped after.
/// A missing binary is a test failure that names the Debian package to install.
final class ServerProcess: @unchecked Sendable {
    let directory: URL
    private var processes: [Process] = []

    init() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("nbd-interop-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    }

    deinit { stop() }

    func path(_ name: String) -> String { directory.appendingPathComponent(name).path }

    /// Which Debian package provides each tool the tests run.
    static let packages = [
        "nbdkit": "nbdkit", "qemu-nbd": "qemu-utils", "qemu-img": "qemu-utils", "qemu-io": "qemu-utils",
        "nbd-server": "nbd-server", "nbdinfo": "libnbd-bin", "nbdcopy": "libnbd-bin", "nbddump": "libnbd-bin",
        "nbdsh": "python3-libnbd", "socat": "socat", "strace": "strace", "unshare": "util-linux",
        "ip": "iproute2",
    ]

    /// The Debian trixie chroot of scripts/chroot.sh: qemu 10 and libnbd 1.22, which speak
    /// extended headers.
    static let trixieRoot: String =
        ProcessInfo.processInfo.environment["NBD_TRIXIE_ROOT"]
        ?? URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent(".chroot/trixie").path

    /// A tool named `trixie:TOOL` runs in the trixie chroot, in `directory`. It sees the host's
    /// /tmp, so that paths are the same in both, through a bind mount made in a mount namespace
    /// of its own: the mount ends with the tool and is never seen outside it, so no mount is left
    /// behind by a run that is killed (one left in the host's namespace once made `rm -rf` of
    /// the clone empty the host's /tmp).
    static func command(_ tool: String, _ arguments: [String], in directory: URL) throws -> (String, [String]) {
        guard tool.hasPrefix("trixie:") else { return (try executable(tool), arguments) }
        let name = String(tool.dropFirst("trixie:".count))
        let root = trixieRoot
        guard FileManager.default.isExecutableFile(atPath: "\(root)/usr/bin/\(name)") else {
            throw InteropError(
                "\(name) from Debian trixie is missing: run scripts/chroot.sh (trixie's \(packages[name] ?? name) in \(root))"
            )
        }
        // unshare, sh and chroot each exec the next: the process is the tool, for signals.
        let enter = [
            #"root=$1 folder=$2; shift 2; mount --bind /tmp "$root/tmp" &&"#,
            #"exec chroot "$root" /bin/sh -c 'cd "$0" && exec "$@"' "$folder" "$@""#,
        ].joined(separator: " ")
        return (
            try executable("unshare"),
            ["--mount", "--propagation", "private", "/bin/sh", "-c", enter, "sh", root, directory.path, name] + arguments
        )
    }

    static func executable(_ tool: String) throws -> String {
        if tool.hasPrefix("/") { return tool }
        for folder in ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/bin", "/sbin"] {
            let candidate = "\(folder)/\(tool)"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        throw InteropError("\(tool) is not installed: apt-get install \(packages[tool] ?? tool)")
    }

    /// Starts `tool` in the background; with `waitFor`, waits until that path exists.
    @discardableResult
    func start(_ tool: String, _ arguments: [String], waitFor socket: String? = nil, probe: Bool = true) async throws -> Process {
        let process = Process()
        let (executable, arguments) = try Self.command(tool, arguments, in: directory)
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        process.currentDirectoryURL = directory
        let logPath = path("\(URL(fileURLWithPath: tool).lastPathComponent).log")
        if !FileManager.default.fileExists(atPath: logPath) { _ = FileManager.default.createFile(atPath: logPath, contents: nil) }
        let log = try FileHandle(forWritingTo: URL(fileURLWithPath: logPath))
        process.standardOutput = log
        process.standardError = log
        try process.run()
        processes.append(process)
        if let socket {
            // A socket file exists from bind(); the server accepts only after listen(), so a
            // socket is waited for until a connection goes through. nbd-server -d serves one
            // connection at a time and is not probed; neither is a file that is not a socket.
            let probing = socket.hasSuffix(".sock") && probe
            do {
                try await waitUntil("\(tool) to create \(socket)\(probing ? " and accept on it" : "")") {
                    guard process.isRunning else { throw InteropError("\(tool) ended") }
                    guard FileManager.default.fileExists(atPath: socket) else { return false }
                    guard probing else { return true }
                    return try await RawClientProbe.canConnect(socket)
                }
            } catch {
                let output = (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? ""
                throw InteropError("\(tool) did not create \(socket) (\(error)): \(output)")
            }
        }
        return process
    }

    /// Starts nbdkit serving `plugin` (e.g. `pattern 4G`) at 50 MiB/s: a copy of gigabytes is
    /// still running seconds later, when a test stops or kills the server. Returns the process
    /// and its URI.
    func slowNBDKit(_ plugin: [String]) async throws -> (process: Process, uri: String) {
        let socket = path("slow.sock")
        let process = try await start(
            "nbdkit",
            ["--foreground", "--unix", socket, "--filter=rate"] + plugin + ["rate=50M"],
            waitFor: socket
        )
        return (process, NBDURI(socket: socket).description)
    }

    /// Starts nbdkit on a Unix socket with the given plugin, filters and parameters; each
    /// server of the folder on a socket of its own.
    /// nbdkit on a Unix socket. Not with `--exit-with-parent`: on Linux that is
    /// PR_SET_PDEATHSIG, sent when the *thread* that spawned it ends, and the threads of Swift's
    /// concurrency pool come and go, so nbdkit died at random between two steps of a test.
    /// ``stop()`` ends it. `tool` may be `trixie:nbdkit`.
    func nbdkit(_ arguments: [String], tool: String = "nbdkit") async throws -> NBDURI {
        let socket = path(processes.isEmpty ? "nbdkit.sock" : "nbdkit-\(processes.count).sock")
        try await start(tool, ["--foreground", "--unix", socket] + arguments, waitFor: socket)
        return NBDURI(socket: socket)
    }

    /// Runs a tool to completion and returns its standard output; fails on a non-zero exit.
    func run(_ tool: String, _ arguments: [String]) throws -> Data {
        let (executable, fullArguments) = try Self.command(tool, arguments, in: directory)
        let result = try runProcess(executable, fullArguments, in: directory)
        guard result.status == 0 else {
            throw InteropError("\(tool) \(arguments.joined(separator: " ")) failed (\(result.status)): \(result.error)")
        }
        return result.output
    }

    func stop() {
        for process in processes where process.isRunning {
            // SIGKILL, not terminate(): a child spawned from a Swift concurrency thread inherits
            // its blocked signal mask, SIGTERM included. And not waitUntilExit(), which can hang
            // on such a thread.
            kill(process.processIdentifier, SIGKILL)
            let deadline = ContinuousClock.now + waitDeadline
            while process.isRunning, ContinuousClock.now < deadline { usleep(2_000) }
        }
        processes = []
        try? FileManager.default.removeItem(at: directory)
    }

    /// Waits until a server started by `process` accepts on loopback `port`: a client is
    /// greeted, then aborts. Fails at once when the process ends first (its port taken, say).
    func waitUntilListening(port: Int, process: Process) async throws {
        var configuration = NBDClientConfiguration()
        configuration.connectTimeout = .seconds(1)
        // A server that accepts but does not greet is listening all the same: qemu-nbd -e 4
        // leaves a fifth client waiting once a reconnecting client has its four back.
        configuration.negotiationTimeout = .seconds(1)
        var seen = "nothing tried"
        try await waitUntil("a server to accept on port \(port)", seen: seen) {
            guard process.isRunning else { throw InteropError("the server for port \(port) ended: \(seen)") }
            do {
                let connection = try await NBDConnection.connect(to: .tcp(host: "127.0.0.1", port: port), configuration: configuration)
                await connection.abort()
                return true
            } catch let error as NBDError where error.code == .timedOut {
                return true
            } catch {
                seen = "\(error)"
                return false
            }
        }
    }

    /// Starts `tool` listening on a loopback TCP port that the kernel handed out, with the
    /// command line `arguments(port)`, and waits until it accepts (or, with `waitFor`, until
    /// that file exists: a pid file written once it listens). A port another process took
    /// between the reservation and the server's bind makes the server end: it is started again
    /// on a new port, up to five times.
    func startOnFreePort(
        _ tool: String,
        waitFor file: String? = nil,
        _ arguments: (Int) -> [String]
    ) async throws -> (process: Process, port: Int) {
        var failures: [String] = []
        for _ in 0..<5 {
            let port = try freeLoopbackPort()
            do {
                if let file { return (try await start(tool, arguments(port), waitFor: file), port) }
                let process = try await start(tool, arguments(port))
                try await waitUntilListening(port: port, process: process)
                return (process, port)
            } catch let error as InteropError where processes.last.map({ !$0.isRunning }) ?? true {
                failures.append(error.description)
            }
        }
        throw InteropError("\(tool) could not listen on five ports the kernel gave: \(failures.joined(separator: "; "))")
    }
}

struct InteropError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// Deterministic non-zero test data, made 8 bytes at a time through a raw pointer: a debug
/// build pays per call, and a call per word made 32 MiB cost 4 s.
func pattern(_ count: Int, seed: UInt8) -> ByteBuffer {
    let words = (count + 7) / 8
    var buffer = ByteBuffer()
    buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: words * 8) { bytes in
        guard let base = bytes.baseAddress else { return 0 }
        var value = UInt64(seed) | 1
        for index in 0..<words {
            value = value &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            base.storeBytes(of: (value | 0x0101_0101_0101_0101).bigEndian, toByteOffset: index &* 8, as: UInt64.self)
        }
        return words * 8
    }
    buffer.moveWriterIndex(to: count)
    return buffer
}

/// `nbd info`'s output without the one line nbdinfo does not print (`can_resize`, of the
/// RESIZE extension), to compare the two.
func asNbdinfoPrintsIt(_ output: String) -> String {
    output.split(separator: "\n", omittingEmptySubsequences: false).filter { !$0.contains("can_resize") }.joined(separator: "\n")
}

/// One line of `nbdinfo --map --json`.
struct MapEntry: Decodable, Hashable {
    var offset: UInt64
    var length: UInt64
    var type: UInt64
}

/// Our extents over the whole export for `context`, adjacent equal ones merged as nbdinfo does
/// (by the library's `mergingNeighbours()`, which the comparison with nbdinfo then checks).
func mapExport(_ export: NBDExport, context: NBDMetaContext) async throws -> [MapEntry] {
    var entries: [MapEntry] = []
    for try await extent in export.extents(of: context).mergingNeighbours() {
        entries.append(MapEntry(offset: extent.offset, length: extent.length, type: extent.flags))
    }
    return entries
}

/// `nbdinfo --map --json` on the same export.
func nbdinfoMap(_ server: ServerProcess, _ uri: NBDURI, context: String = "base:allocation") throws -> [MapEntry] {
    let data = try server.run("nbdinfo", ["--map=\(context)", "--json", uri.description])
    return try JSONDecoder().decode([MapEntry].self, from: data)
}

/// The `nbd` executable built beside the test bundle.
let nbdTool: String = {
    let executable = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    return URL(fileURLWithPath: executable).deletingLastPathComponent().appendingPathComponent("nbd").path
}()

/// Runs `nbd` and returns its exit status, standard output and standard error.
func runNBD(_ arguments: [String]) throws -> (status: Int32, output: String, error: String) {
    let result = try runProcess(nbdTool, arguments)
    return (result.status, String(decoding: result.output, as: UTF8.self), result.error)
}

extension NBDURI {
    /// The socket of a Unix URI: the tests' servers listen on one.
    var socketPath: String {
        get throws {
            guard case .unix(let path) = transport else { throw InteropError("\(self) is not on a Unix socket") }
            return path
        }
    }
}

/// `bound`, scaled for a slow run: scripts/sanitize.sh sets NBD_TEST_TIME_SCALE, since a
/// sanitizer makes everything several times slower. A normal run checks each bound as stated.
func within(_ bound: Duration) -> Duration {
    bound * (ProcessInfo.processInfo.environment["NBD_TEST_TIME_SCALE"].flatMap(Double.init) ?? 1)
}

/// Whether two files hold the same bytes, reading only the ranges either has data in (found with
/// SEEK_DATA and SEEK_HOLE): holes read as zeroes, so a 4 GiB sparse image compares in
/// milliseconds where `cmp` or `sha256sum` read every zero.
func sameContents(_ first: String, _ second: String) throws -> Bool {
    let handles = try [first, second].map { try FileHandle(forReadingFrom: URL(fileURLWithPath: $0)) }
    defer { for handle in handles { try? handle.close() } }
    let sizes = try handles.map { try $0.seekToEnd() }
    guard sizes[0] == sizes[1] else { return false }
    // Linux's values of SEEK_DATA and SEEK_HOLE, which Glibc does not export to Swift.
    let (seekData, seekHole): (Int32, Int32) = (3, 4)
    func dataRanges(_ handle: FileHandle) -> [Range<UInt64>] {
        var ranges: [Range<UInt64>] = []
        var position: off_t = 0
        while UInt64(position) < sizes[0] {
            let start = lseek(handle.fileDescriptor, position, seekData)
            guard start >= 0 else { break }
            let end = lseek(handle.fileDescriptor, start, seekHole)
            ranges.append(UInt64(start)..<UInt64(end))
            position = end
        }
        return ranges
    }
    for range in handles.flatMap(dataRanges) {
        var offset = range.lowerBound
        while offset < range.upperBound {
            let count = Int(min(range.upperBound - offset, 1 << 20))
            let pieces = try handles.map { handle in
                try handle.seek(toOffset: offset)
                return try handle.read(upToCount: count) ?? Data()
            }
            guard pieces[0] == pieces[1], pieces[0].count == count else { return false }
            offset += UInt64(count)
        }
    }
    return true
}

/// Bytes the file takes on disk.
func allocatedBytes(_ path: String) -> Int {
    var info = stat()
    return stat(path, &info) == 0 ? Int(info.st_blocks) * 512 : -1
}

/// Runs a program to its end, its output discarded, and returns its exit status and its peak
/// resident memory in KiB (the rusage of wait4: Process does not give it).
func peakMemory(_ executable: String, _ arguments: [String]) throws -> (status: Int32, peakKiB: Int) {
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    for descriptor: Int32 in [1, 2] { posix_spawn_file_actions_addopen(&actions, descriptor, "/dev/null", O_WRONLY, 0) }
    let argv = ([executable] + arguments).map { strdup($0) } + [nil]
    defer { for pointer in argv { free(pointer) } }
    var pid = pid_t()
    let spawned = posix_spawn(&pid, executable, &actions, nil, argv, environ)
    guard spawned == 0 else { throw InteropError("cannot start \(executable): \(String(cString: strerror(spawned)))") }
    var status: Int32 = 0
    var usage = rusage()
    while wait4(pid, &status, 0, &usage) < 0 {
        guard errno == EINTR else { throw InteropError("wait4 failed: \(String(cString: strerror(errno)))") }
    }
    // WIFEXITED and WEXITSTATUS, which Swift does not import.
    return ((status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f), Int(usage.ru_maxrss))
}

/// Data bytes qemu-nbd sent in read replies, from its trace
/// (`--trace enable=nbd_co_send_structured_read*,file=TRACE`).
func qemuBytesSent(_ trace: String) -> Int {
    let text = (try? String(contentsOfFile: trace, encoding: .utf8)) ?? ""
    return text.split(separator: "\n").filter { $0.hasPrefix("nbd_co_send_structured_read ") }
        .compactMap { $0.split(separator: "len = ").last.flatMap { Int($0) } }.reduce(0, +)
}
