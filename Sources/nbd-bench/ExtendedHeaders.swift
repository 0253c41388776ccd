// `nbd-bench extended`: what extended headers change, against qemu-nbd 10 and libnbd 1.22 from
// the Debian trixie chroot (scripts/chroot.sh makes it; NBD_TRIXIE_ROOT names another one).
//
//     swift build -c release && .build/release/nbd-bench extended [--size 4G] [--rounds 3]
//
// Read: a raw file of SIZE non-zero bytes served by qemu-nbd 10, read over one connection with
// 64 requests of 256 KiB in flight, with extended headers and with structured replies, beside
// `nbdcopy --connections=1 --no-extents URI null:` 1.22 (which asks for extended headers) on the
// same export; alternating, median of the rounds.
//
// Map: a 1 TiB sparse raw file with 4 KiB of data every 16 MiB (131072 extents) served by
// qemu-nbd 10, mapped by `nbd info --map` (extended headers) and by `nbdinfo --map` 1.22; the
// library's extent sequence with structured replies for contrast, where one request covers less
// than 4 GiB. qemu-nbd's trace of each request it decodes counts the block-status requests.
import Foundation
import NBD
import NIOCore

extension Benchmark {
    /// A chroot of scripts/chroot.sh, the host's view of its /tmp folder for this run, and the
    /// same folder seen from inside.
    struct Chroot {
        var root: String
        var hostDirectory: String
        var directory: String

        /// `suite`'s chroot: NBD_TRIXIE_ROOT for trixie, else `.chroot/SUITE`; it must hold `tool`.
        init(_ suite: String, holding tool: String) throws {
            let environment = suite == "trixie" ? ProcessInfo.processInfo.environment["NBD_TRIXIE_ROOT"] : nil
            root = environment ?? FileManager.default.currentDirectoryPath + "/.chroot/\(suite)"
            guard FileManager.default.isExecutableFile(atPath: root + "/usr/bin/\(tool)") else {
                throw BenchError("no \(suite) chroot with \(tool) at \(root): make it with scripts/chroot.sh \(suite)")
            }
            directory = "/tmp/nbd-bench-\(getpid())"
            hostDirectory = root + directory
            try FileManager.default.createDirectory(atPath: hostDirectory, withIntermediateDirectories: true)
        }

        /// The arguments that run `tool` inside the chroot.
        func command(_ tool: String, _ arguments: [String]) -> [String] { [root, tool] + arguments }

        /// Starts qemu-nbd 10 on a raw file of the chroot's folder; waits for its socket.
        func startQemuNBD(image: String, socket: String, trace: String? = nil) async throws -> Process {
            var arguments = ["-t", "-f", "raw", "--socket=\(directory)/\(socket)"]
            if let trace {
                arguments.append("--trace=enable=nbd_co_receive_request_decode_type,file=\(directory)/\(trace)")
            }
            let process = try start("/usr/sbin/chroot", command("qemu-nbd", arguments + ["\(directory)/\(image)"]))
            try await Benchmark.waitFor("\(hostDirectory)/\(socket)")
            return process
        }

        /// Block-status requests qemu-nbd has decoded so far, from its trace.
        func blockStatusRequests(trace: String) -> Int {
            let text = (try? String(contentsOfFile: "\(hostDirectory)/\(trace)", encoding: .utf8)) ?? ""
            return text.split(separator: "\n").filter { $0.hasSuffix("(block status)") }.count
        }
    }

    static func runExtended(_ options: Options) async throws {
        let trixie = try Chroot("trixie", holding: "qemu-nbd")
        defer { try? FileManager.default.removeItem(atPath: trixie.hostDirectory) }
        var servers: [Process] = []
        defer { for server in servers { kill(server.processIdentifier, SIGKILL) } }

        print("writing a \(options.size >> 20) MiB raw file of non-zero data ...")
        try writeFilled("\(trixie.hostDirectory)/data.img", size: options.size)
        servers.append(try await trixie.startQemuNBD(image: "data.img", socket: "data.sock"))
        try await compareReads(trixie, options)

        print("")
        print("writing a 1 TiB sparse raw file with 4 KiB of data every 16 MiB ...")
        try writeSparse("\(trixie.hostDirectory)/sparse.img", size: 1 << 40, every: 16 << 20)
        servers.append(try await trixie.startQemuNBD(image: "sparse.img", socket: "sparse.sock", trace: "trace.log"))
        try await compareMaps(trixie, options)
    }

    static func compareReads(_ trixie: Chroot, _ options: Options) async throws {
        let hostURI = NBDURI(socket: "\(trixie.hostDirectory)/data.sock")
        let chrootURI = NBDURI(socket: "\(trixie.directory)/data.sock").description
        var extended = NBDClientConfiguration()
        extended.maximumRequestsInFlight = options.inFlight
        var structured = extended
        structured.transmissionFormat = .structured
        var runs: [String: [Run]] = [:]
        let names = ["swift-nbd, extended headers", "swift-nbd, structured replies", "nbdcopy 1.22"]
        for round in 1...options.rounds {
            runs[names[0], default: []].append(
                try await measureSelf { try await readAll(hostURI, options, configuration: extended, segments: false) }
            )
            runs[names[1], default: []].append(
                try await measureSelf { try await readAll(hostURI, options, configuration: structured, segments: false) }
            )
            let cpu = cpuSeconds(.children)
            let nbdcopy = try measure(
                "/usr/sbin/chroot",
                trixie.command("nbdcopy", ["--connections=1", "--no-extents", chrootURI, "null:"])
            )
            runs[names[2], default: []].append(
                Run(seconds: nbdcopy.seconds, cpuSeconds: cpuSeconds(.children) - cpu, peakKiB: nbdcopy.peakKiB)
            )
            print("round \(round): " + names.map { "\($0) \(runs[$0]!.last!)" }.joined(separator: ", "))
        }
        let mib = Double(options.size) / Double(1 << 20)
        let theirRate = mib / median(runs[names[2]]!.map(\.seconds))
        print("")
        print(
            "read \(Int(mib)) MiB from qemu-nbd 10 (raw file), 1 connection, \(options.inFlight) x "
                + "\(options.requestSize >> 10) KiB in flight, Unix socket, median of \(options.rounds)"
        )
        for name in names {
            let rate = mib / median(runs[name]!.map(\.seconds))
            print(
                name.padding(toLength: 30, withPad: " ", startingAt: 0)
                    + String(
                        format: "%8.1f MiB/s   CPU %5.2f s   peak RSS %6.1f MiB   ratio to nbdcopy %.2f",
                        rate,
                        median(runs[name]!.map(\.cpuSeconds)),
                        Double(runs[name]!.map(\.peakKiB).max()!) / 1024,
                        rate / theirRate
                    )
            )
        }
    }

    static func compareMaps(_ trixie: Chroot, _ options: Options) async throws {
        let tool = try requireNBDTool()
        let hostURI = NBDURI(socket: "\(trixie.hostDirectory)/sparse.sock")
        let chrootURI = NBDURI(socket: "\(trixie.directory)/sparse.sock").description
        var structured = NBDClientConfiguration()
        structured.transmissionFormat = .structured
        let names = ["nbd info --map, extended", "library, structured replies", "nbdinfo 1.22 --map"]
        var seconds: [String: [Double]] = [:]
        var requests: [String: Int] = [:]
        var extents: [String: Int] = [:]
        for _ in 1...options.rounds {
            for name in names {
                let before = trixie.blockStatusRequests(trace: "trace.log")
                switch name {
                case names[0]:
                    let (time, lines) = try timedLines(tool, ["info", "--map", hostURI.description])
                    seconds[name, default: []].append(time)
                    extents[name] = lines
                case names[1]:
                    let start = ContinuousClock.now
                    let export = try await NBDExport.connect(to: hostURI, configuration: structured)
                    var count = 0
                    for try await _ in export.extents() { count += 1 }
                    await export.disconnect()
                    seconds[name, default: []].append((ContinuousClock.now - start) / .seconds(1))
                    extents[name] = count
                default:
                    let (time, lines) = try timedLines("/usr/sbin/chroot", trixie.command("nbdinfo", ["--map", chrootURI]))
                    seconds[name, default: []].append(time)
                    extents[name] = lines
                }
                // The trace is written as each request is decoded; give its last line a moment.
                try await Task.sleep(for: .milliseconds(100))
                requests[name] = trixie.blockStatusRequests(trace: "trace.log") - before
            }
        }
        print("")
        print("map a 1 TiB sparse raw file on qemu-nbd 10, base:allocation, median of \(options.rounds)")
        for name in names {
            print(
                name.padding(toLength: 30, withPad: " ", startingAt: 0)
                    + String(
                        format: "%7.3f s   %4d block-status requests   %6d extents",
                        median(seconds[name]!),
                        requests[name]!,
                        extents[name]!
                    )
            )
        }
    }

    /// Runs a tool to the end; its time and the number of lines it printed.
    static func timedLines(_ tool: String, _ arguments: [String]) throws -> (seconds: Double, lines: Int) {
        let (status, output, seconds) = try runCollecting(tool, arguments)
        guard status == 0 else { throw BenchError("\(tool) \(arguments.joined(separator: " ")) failed") }
        return (seconds, output.reduce(0) { $0 + ($1 == UInt8(ascii: "\n") ? 1 : 0) })
    }

    /// Runs a tool to the end: its exit status, what it printed and the seconds it took.
    static func runCollecting(_ tool: String, _ arguments: [String]) throws -> (status: Int32, output: Data, seconds: Double) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: tool)
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = FileHandle.nullDevice
        let start = Date()
        try process.run()
        let output = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, output, Date().timeIntervalSince(start))
    }

    /// A file of `size` bytes of a non-zero pattern.
    static func writeFilled(_ path: String, size: UInt64) throws {
        guard FileManager.default.createFile(atPath: path, contents: nil) else { throw BenchError("cannot create \(path)") }
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        defer { try? handle.close() }
        let block = Data((0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 % 251 + 1) })
        var written: UInt64 = 0
        while written < size {
            let count = Int(min(UInt64(block.count), size - written))
            try handle.write(contentsOf: block.prefix(count))
            written += UInt64(count)
        }
    }

    /// A sparse file of `size` bytes with 4 KiB of data at every multiple of `every`.
    static func writeSparse(_ path: String, size: UInt64, every: UInt64) throws {
        guard FileManager.default.createFile(atPath: path, contents: nil) else { throw BenchError("cannot create \(path)") }
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        defer { try? handle.close() }
        let block = Data(repeating: 0x5A, count: 4096)
        var offset: UInt64 = 0
        while offset < size {
            try handle.seek(toOffset: offset)
            try handle.write(contentsOf: block)
            offset += every
        }
        try handle.truncate(atOffset: size)
    }
}
