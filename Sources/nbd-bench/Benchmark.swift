// Throughput benchmarks, each beside libnbd's tool in the same run (`nbd-bench --help` lists
// them; the arguments are parsed with ArgumentParser, as the `nbd` tool's are).
//
//     swift run -c release nbd-bench [--size 4G] [--request-size 256K] [--in-flight 64] [--rounds 3] [--tls]
//     swift build -c release && .build/release/nbd-bench copy [--size 4G] [--rounds 3]
//     swift build -c release && .build/release/nbd-bench checksum [--size 4G] [--rounds 3] (see ChecksumBench.swift)
//     swift build -c release && .build/release/nbd-bench extended [--size 4G] [--rounds 3] (see ExtendedHeaders.swift)
//     swift build -c release && .build/release/nbd-bench client [--size 4G] [--rounds 3] (see ClientBench.swift)
//     swift build -c release && .build/release/nbd-bench map [--rounds 5] (see MemoryMap.swift)
//     swift build -c release && .build/release/nbd-bench soak [--clients 64] [--seconds 60] (see Soak.swift)
//     swift build -c release && .build/release/nbd-bench sparse [--size 100G] [--rounds 3] (see SparseFileBench.swift)
//     swift build -c release && .build/release/nbd-bench requests [--size 512M] [--rounds 5] (see RequestsBench.swift)
//
// The first (the library):
// Starts `nbdkit memory SIZE` on a temporary Unix socket, fills it with non-zero data (so no
// hole is skipped), then reads it all over one connection with 64 requests of 256 KiB in
// flight into reused buffers, and runs `nbdcopy --connections=1 --no-extents URI null:` with the
// same request size and requests in flight on the same export, alternating the two for a few
// rounds. Prints the median MiB/s and the peak memory of both, and the ratio.
//
// `copy` (the `nbd` tool, built beside this executable): `nbd copy` and `nbdcopy`, both with
// their defaults, from a filled `nbdkit memory SIZE` to null:, from it to a second nbdkit memory
// server, and from `nbdkit sparse-random 16G` to null:.
import Foundation
import NBD
import NBDServer
import NIOConcurrencyHelpers
import NIOCore

/// The benchmarks' shared code; the subcommands are in Commands.swift.
struct Benchmark {
    /// What every throughput benchmark takes.
    struct Options {
        var size: UInt64 = 4 << 30
        var requestSize = 256 << 10
        var inFlight = 64
        var rounds = 3
        var tls = false
    }

    static func run(_ options: Options) async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("nbd-bench-\(getpid())")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let socket = directory.appendingPathComponent("nbdkit.sock").path
        var tlsArguments: [String] = []
        var uri = NBDURI(socket: socket)
        if options.tls {
            // Over TLS: a CA and a server certificate made here; both readers trust the CA.
            let pki = directory.appendingPathComponent("pki").path
            try makeCertificates(in: pki)
            tlsArguments = ["--tls=require", "--tls-certificates", pki]
            uri = try NBDURI("nbds+unix:///?socket=\(socket)&tls-certificates=\(pki)&tls-hostname=localhost")
        }
        let server = try await startNBDKit(socket: socket, tlsArguments + ["memory", "\(options.size)"])
        // SIGKILL: children of Swift concurrency threads inherit a mask that blocks SIGTERM.
        defer { kill(server.processIdentifier, SIGKILL) }

        print("filling nbdkit memory \(options.size >> 20) MiB with non-zero data ...")
        var configuration = NBDClientConfiguration()
        configuration.uriMayReadLocalFiles = true  // the URI names the certificates made above
        try await fill(uri, options, configuration: configuration)
        configuration.maximumRequestsInFlight = options.inFlight
        // Alternate the two readers and keep each one's median, so that a disturbance of the
        // machine during one run does not decide the ratio.
        var ours: [Run] = []
        var segments: [Run] = []
        var theirs: [Run] = []
        print("resident before reading: \(residentKiB() >> 10) MiB")
        for round in 1...options.rounds {
            ours.append(try await measureSelf { try await readAll(uri, options, configuration: configuration, segments: false) })
            segments.append(try await measureSelf { try await readAll(uri, options, configuration: configuration, segments: true) })
            let cpu = cpuSeconds(.children)
            let nbdcopy = try measure(
                "nbdcopy",
                [
                    "--connections=1", "--request-size=\(options.requestSize)", "--requests=\(options.inFlight)", "--no-extents",
                    uri.description, "null:",
                ]
            )
            theirs.append(Run(seconds: nbdcopy.seconds, cpuSeconds: cpuSeconds(.children) - cpu, peakKiB: nbdcopy.peakKiB))
            print("round \(round): read(into:) \(ours.last!), readSegments \(segments.last!), nbdcopy \(theirs.last!)")
        }

        let mib = Double(options.size) / Double(1 << 20)
        let theirRate = mib / median(theirs.map(\.seconds))
        print("")
        print(
            "read \(Int(mib)) MiB, 1 connection, \(options.inFlight) x \(options.requestSize >> 10) KiB in flight, "
                + "Unix socket\(options.tls ? " with TLS" : ""), median of \(options.rounds)"
        )
        for (name, runs) in [("swift-nbd read(into:)", ours), ("swift-nbd readSegments", segments), ("nbdcopy", theirs)] {
            let rate = mib / median(runs.map(\.seconds))
            print(
                name.padding(toLength: 24, withPad: " ", startingAt: 0)
                    + String(
                        format: "%8.1f MiB/s   CPU %5.2f s   peak RSS %6.1f MiB   ratio to nbdcopy %.2f",
                        rate,
                        median(runs.map(\.cpuSeconds)),
                        Double(runs.map(\.peakKiB).max()!) / 1024,
                        rate / theirRate
                    )
            )
        }
    }

    /// Whose CPU time: this process, or its children that were waited for.
    enum CPUOf { case this, children }

    /// One timed run: wall clock, CPU time, peak memory.
    struct Run: CustomStringConvertible {
        var seconds: Double
        var cpuSeconds: Double
        var peakKiB: Int
        var description: String { String(format: "%.2f s (CPU %.2f s, peak %d MiB)", seconds, cpuSeconds, peakKiB >> 10) }
    }

    /// Runs `body` in this process, measuring its CPU time and peak memory.
    static func measureSelf(_ body: () async throws -> Double) async throws -> Run {
        resetPeakMemory()
        let cpu = cpuSeconds(.this)
        let seconds = try await body()
        return Run(seconds: seconds, cpuSeconds: cpuSeconds(.this) - cpu, peakKiB: peakMemory(of: "self"))
    }

    static func median(_ values: [Double]) -> Double {
        let sorted = values.sorted()
        return sorted.count % 2 == 1 ? sorted[sorted.count / 2] : (sorted[sorted.count / 2 - 1] + sorted[sorted.count / 2]) / 2
    }

    static func runCopy(_ options: Options) async throws {
        let tool = try requireNBDTool()
        let servers = try NBDKitServers()
        defer { servers.stop() }
        let source = try await servers.serve("source", ["memory", "\(options.size)"])
        let destination = try await servers.serve("destination", ["memory", "\(options.size)"])
        let sparse = try await servers.serve("sparse", ["sparse-random", "16G"])
        print("filling nbdkit memory \(options.size >> 20) MiB with non-zero data ...")
        try await fill(source, options)
        // Once untimed, so that nbdkit allocates the destination's pages before any timed run:
        // otherwise whoever copies first pays for it.
        _ = try measure("nbdcopy", [source.description, destination.description])

        let cases: [(String, [String], UInt64)] = [
            ("memory \(options.size >> 30)G -> null:", [source.description, "null:"], options.size),
            ("memory -> memory", [source.description, destination.description], options.size),
            ("sparse-random 16G -> null:", [sparse.description, "null:"], 16 << 30),
        ]
        print("")
        for (name, arguments, bytes) in cases {
            var ours: [(seconds: Double, peakKiB: Int)] = []
            var theirs: [(seconds: Double, peakKiB: Int)] = []
            for _ in 0..<options.rounds {
                ours.append(try measure(tool, ["copy"] + arguments))
                theirs.append(try measure("nbdcopy", arguments))
            }
            let mib = Double(bytes) / Double(1 << 20)
            let ourRate = mib / median(ours.map(\.seconds))
            let theirRate = mib / median(theirs.map(\.seconds))
            print(
                name.padding(toLength: 28, withPad: " ", startingAt: 0)
                    + String(
                        format: "nbd copy %8.1f MiB/s (%3d MiB)   nbdcopy %8.1f MiB/s (%3d MiB)   ratio %.2f",
                        ourRate,
                        ours.map(\.peakKiB).max()! >> 10,
                        theirRate,
                        theirs.map(\.peakKiB).max()! >> 10,
                        ourRate / theirRate
                    )
            )
        }
    }

    /// nbdcopy writing SIZE to, then reading it from, the built-in memory server and
    /// `nbdkit memory`, same data, same run.
    static func runServer(_ options: Options) async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("nbd-bench-\(getpid())")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let ourSocket = directory.appendingPathComponent("ours.sock").path
        let server = try await NBDServer.start(
            exports: [NBDServerExport(backend: MemoryBackend(size: options.size))],
            on: .unix(path: ourSocket)
        )
        let theirSocket = directory.appendingPathComponent("nbdkit.sock").path
        let nbdkit = try await startNBDKit(socket: theirSocket, ["memory", "\(options.size)"])
        defer { kill(nbdkit.processIdentifier, SIGKILL) }
        // The data to write comes from nbdkit's pattern plugin (non-zero, so nothing is skipped).
        let patternSocket = directory.appendingPathComponent("pattern.sock").path
        let pattern = try await startNBDKit(socket: patternSocket, ["pattern", "\(options.size)"])
        defer { kill(pattern.processIdentifier, SIGKILL) }
        let ours = NBDURI(socket: ourSocket).description
        let theirs = NBDURI(socket: theirSocket).description
        let source = NBDURI(socket: patternSocket).description
        let mib = Double(options.size) / Double(1 << 20)
        print("nbdcopy against the built-in server and nbdkit memory, \(Int(mib)) MiB, median of \(options.rounds)")
        for (name, toOurs, toTheirs) in [("write", [source, ours], [source, theirs]), ("read", [ours, "null:"], [theirs, "null:"])] {
            var our: [Double] = []
            var their: [Double] = []
            for _ in 0..<options.rounds {
                our.append(try measure("nbdcopy", toOurs).seconds)
                their.append(try measure("nbdcopy", toTheirs).seconds)
            }
            let ourRate = mib / median(our)
            let theirRate = mib / median(their)
            print(
                name.padding(toLength: 8, withPad: " ", startingAt: 0)
                    + String(format: "built-in %8.1f MiB/s   nbdkit %8.1f MiB/s   ratio %.2f", ourRate, theirRate, ourRate / theirRate)
            )
        }
        await server.shutdown()
    }

    /// A CA and a certificate for localhost, in the directory layout nbdkit and libnbd share.
    static func makeCertificates(in directory: String) throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let script = """
            set -e; cd '\(directory)'
            openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca-cert.pem -days 2 -subj "/CN=bench CA" 2>/dev/null
            openssl req -newkey rsa:2048 -nodes -keyout server-key.pem -out server.csr -subj "/CN=localhost" 2>/dev/null
            printf "subjectAltName=DNS:localhost\\n" > ext.cnf
            openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
            -out server-cert.pem -days 2 -extfile ext.cnf 2>/dev/null
            """
        let process = try start("/bin/sh", ["-c", script])
        while process.isRunning { usleep(10_000) }
        guard process.terminationStatus == 0 else { throw BenchError("openssl could not make the test certificates") }
    }

    static func fill(_ uri: NBDURI, _ options: Options, configuration: NBDClientConfiguration = NBDClientConfiguration()) async throws {
        let export = try await NBDExport.connect(to: uri, configuration: configuration)
        let block = ByteBuffer(bytes: (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 % 251 + 1) })
        let counter = Counter(limit: options.size, step: UInt64(block.readableBytes))
        try await withThrowingTaskGroup(of: Void.self) { group in
            for _ in 0..<16 {
                group.addTask {
                    while let offset = counter.next() { try await export.write(block, at: offset) }
                }
            }
            try await group.waitForAll()
        }
        await export.disconnect()
    }

    /// Reads the whole export; returns the seconds taken.
    /// With `segments`, the data is taken as it arrived (``NBDExport/readSegments``), without
    /// the copy into the task's buffer.
    static func readAll(_ uri: NBDURI, _ options: Options, configuration: NBDClientConfiguration, segments: Bool) async throws -> Double {
        let export = try await NBDExport.connect(to: uri, configuration: configuration)
        let counter = Counter(limit: options.size, step: UInt64(options.requestSize))
        let start = ContinuousClock.now
        try await withTaskExecutorPreference(export.taskExecutor) {
            try await withThrowingTaskGroup(of: Void.self) { group in
                for _ in 0..<options.inFlight {
                    group.addTask {
                        var buffer = ByteBuffer()
                        buffer.reserveCapacity(options.requestSize)
                        while let offset = counter.next() {
                            let length = min(UInt64(options.requestSize), options.size - offset)
                            // The data is real: a zero byte would mean a hole was read.
                            if segments {
                                let first = try await export.readSegments(at: offset, length: length)[0]
                                guard first.getInteger(at: first.readerIndex, as: UInt8.self) != 0 else {
                                    throw BenchError("read zeroes at \(offset)")
                                }
                            } else {
                                buffer.clear()
                                try await export.read(into: &buffer, at: offset, length: length)
                                guard buffer.getInteger(at: 0, as: UInt8.self) != 0 else { throw BenchError("read zeroes at \(offset)") }
                            }
                        }
                    }
                }
                try await group.waitForAll()
            }
        }
        let elapsed = ContinuousClock.now - start
        await export.disconnect()
        return Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
    }

    // MARK: Processes and memory

    /// The `nbd` tool built beside this executable.
    private static var nbdTool: String {
        URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("nbd").path
    }

    /// ``nbdTool``, or a message that says how to build it.
    static func requireNBDTool() throws -> String {
        guard FileManager.default.isExecutableFile(atPath: nbdTool) else {
            throw BenchError("\(nbdTool) is missing: build it with `swift build -c release --product nbd`")
        }
        return nbdTool
    }

    /// Starts nbdkit on a Unix socket and waits for the socket to appear.
    static func startNBDKit(socket: String, _ arguments: [String]) async throws -> Process {
        let process = try start("nbdkit", ["--foreground", "--exit-with-parent", "--unix", socket] + arguments)
        try await waitFor(socket)
        return process
    }

    /// Waits (5 s at most) until a server has made its socket `path`.
    static func waitFor(_ path: String) async throws {
        for _ in 0..<200 where !FileManager.default.fileExists(atPath: path) { try await Task.sleep(for: .milliseconds(25)) }
    }

    static func start(_ tool: String, _ arguments: [String]) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: tool.hasPrefix("/") ? tool : "/usr/bin/env")
        process.arguments = tool.hasPrefix("/") ? arguments : [tool] + arguments
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        do { try process.run() } catch { throw BenchError("cannot run \(tool) (apt-get install nbdkit libnbd-bin): \(error)") }
        return process
    }

    /// Runs a tool to the end, sampling its peak RSS.
    static func measure(_ tool: String, _ arguments: [String]) throws -> (seconds: Double, peakKiB: Int) {
        let process = try start(tool, arguments)
        let start = Date()
        var peak = 0
        while process.isRunning {
            peak = max(peak, peakMemory(of: "\(process.processIdentifier)"))
            usleep(20_000)
        }
        let seconds = Date().timeIntervalSince(start)
        guard process.terminationStatus == 0 else { throw BenchError("\(tool) failed with status \(process.terminationStatus)") }
        return (seconds, peak)
    }

    /// User and system CPU time of this process, or of its children that were waited for.
    static func cpuSeconds(_ who: CPUOf) -> Double {
        let time = cpuTimes(who)
        return time.user + time.system
    }

    /// User and system CPU time apart, of this process or of its children that were waited for.
    static func cpuTimes(_ who: CPUOf) -> (user: Double, system: Double) {
        var usage = rusage()
        #if os(Linux)
        getrusage(__rusage_who_t((who == .children ? RUSAGE_CHILDREN : RUSAGE_SELF).rawValue), &usage)
        #else
        getrusage(who == .children ? RUSAGE_CHILDREN : RUSAGE_SELF, &usage)
        #endif
        func seconds(_ time: timeval) -> Double { Double(time.tv_sec) + Double(time.tv_usec) / 1e6 }
        return (seconds(usage.ru_utime), seconds(usage.ru_stime))
    }

    /// VmHWM (peak resident set) in KiB from /proc.
    static func peakMemory(of pid: String) -> Int {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return 0 }
        for line in status.split(separator: "\n") where line.hasPrefix("VmHWM:") {
            return Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0
        }
        return 0
    }

    /// VmRSS (current resident set) in KiB.
    static func residentKiB() -> Int {
        guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return 0 }
        for line in status.split(separator: "\n") where line.hasPrefix("VmRSS:") {
            return Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0
        }
        return 0
    }

    /// Writing 5 to clear_refs resets VmHWM, so the read phase is measured alone. Memory the
    /// previous round freed is first given back, or it would count in this round's peak.
    static func resetPeakMemory() {
        #if os(Linux)
        _ = mallocTrim(0)
        #endif
        try? "5".write(toFile: "/proc/self/clear_refs", atomically: false, encoding: .utf8)
    }
}

/// Hands out offsets in order to many tasks.
final class Counter: Sendable {
    private let position = NIOLockedValueBox<UInt64>(0)
    private let limit: UInt64
    private let step: UInt64

    init(limit: UInt64, step: UInt64) {
        self.limit = limit
        self.step = step
    }

    func next() -> UInt64? {
        position.withLockedValue { position in
            guard position < limit else { return nil }
            defer { position += step }
            return position
        }
    }
}

struct BenchError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

#if os(Linux)
/// glibc's `malloc_trim`, which Swift's Glibc module does not export.
@_silgen_name("malloc_trim")
func mallocTrim(_ pad: Int) -> Int32
#endif
