// `nbd-bench map`: block status of a sparse terabyte, from the memory backend of `nbd serve`
// beside qemu-nbd 10 (Debian trixie chroot) on a sparse raw file holding the same data.
//
//     swift build -c release && .build/release/nbd-bench map [--rounds 5]
//
// 1000 pages of 64 KiB scattered over 1 TiB are written to `nbd serve --memory 1T` and to a
// 1 TiB sparse file served by qemu-nbd 10; `nbd info --map` (extended headers on both) maps
// each, alternating. Prints the median time, the block-status requests the client sent (from
// its --verbose trace), the extents, and each server's CPU time and peak RSS.
import Foundation
import NBD
import NIOCore

extension Benchmark {
    static func runMemoryMap(_ options: Options) async throws {
        let trixie = try Chroot("trixie", holding: "qemu-nbd")
        defer { try? FileManager.default.removeItem(atPath: trixie.hostDirectory) }
        let tool = try requireNBDTool()
        let size: UInt64 = 1 << 40
        let page = 64 << 10
        let offsets = (0..<1000).map { UInt64($0) * (size / 1000) / UInt64(page) * UInt64(page) }
        let data = ByteBuffer(bytes: (0..<page).map { UInt8(truncatingIfNeeded: $0 % 251 + 1) })

        print("writing 1000 pages of 64 KiB over 1 TiB, to a sparse file and to nbd serve --memory 1T ...")
        let image = "\(trixie.hostDirectory)/sparse.raw"
        guard FileManager.default.createFile(atPath: image, contents: nil) else { throw BenchError("cannot create \(image)") }
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: image))
        for offset in offsets {
            try handle.seek(toOffset: offset)
            try handle.write(contentsOf: Data(data.readableBytesView))
        }
        try handle.truncate(atOffset: size)
        try handle.close()
        let qemu = try await trixie.startQemuNBD(image: "sparse.raw", socket: "qemu.sock")
        let oursSocket = "\(trixie.hostDirectory)/ours.sock"
        let ours = try start(tool, ["serve", "--memory", "1T", "--socket", oursSocket])
        defer { for server in [qemu, ours] { kill(server.processIdentifier, SIGKILL) } }
        try await waitFor(oursSocket)
        let oursURI = NBDURI(socket: oursSocket)
        try await NBDExport.withExport(oursURI) { export in
            for offset in offsets { try await export.write(data, at: offset) }
        }

        let servers: [(name: String, uri: NBDURI, process: Process)] = [
            ("nbd serve --memory 1T", oursURI, ours),
            ("qemu-nbd 10, sparse file", NBDURI(socket: "\(trixie.hostDirectory)/qemu.sock"), qemu),
        ]
        var seconds: [String: [Double]] = [:]
        var cpu: [String: [Double]] = [:]
        var requests: [String: Int] = [:]
        var extents: [String: Int] = [:]
        for _ in 1...options.rounds {
            for server in servers {
                let before = cpuSeconds(of: server.process.processIdentifier)
                let run = try mapped(tool, server.uri)
                seconds[server.name, default: []].append(run.seconds)
                cpu[server.name, default: []].append(cpuSeconds(of: server.process.processIdentifier) - before)
                requests[server.name] = run.requests
                extents[server.name] = run.extents
            }
        }
        print("")
        print("nbd info --map of 1 TiB holding 1000 scattered pages, extended headers, median of \(options.rounds)")
        print("(the last column: time as a multiple of qemu-nbd's)")
        let reference = median(seconds[servers[1].name]!)
        for server in servers {
            let time = median(seconds[server.name]!)
            print(
                server.name.padding(toLength: 26, withPad: " ", startingAt: 0)
                    + String(
                        format: "%7.3f s  %4d block-status requests  %5d extents  server CPU %6.3f s  peak RSS %6.1f MiB  %5.2fx",
                        time,
                        requests[server.name]!,
                        extents[server.name]!,
                        median(cpu[server.name]!),
                        Double(peakMemory(of: "\(server.process.processIdentifier)")) / 1024,
                        time / reference
                    )
            )
        }
    }

    /// `nbd info --map --verbose URI`: its time, the block-status requests its trace shows,
    /// and the extents it printed.
    static func mapped(_ tool: String, _ uri: NBDURI) throws -> (seconds: Double, requests: Int, extents: Int) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: tool)
        process.arguments = ["info", "--map", "--verbose", uri.description]
        let output = Pipe()
        let trace = Pipe()
        process.standardOutput = output
        process.standardError = trace
        let start = Date()
        try process.run()
        // The trace is small: read it after the map, whose pipe could otherwise fill.
        let printed = output.fileHandleForReading.readDataToEndOfFile()
        let traced = trace.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        let seconds = Date().timeIntervalSince(start)
        guard process.terminationStatus == 0 else { throw BenchError("nbd info --map \(uri) failed") }
        let lines = String(decoding: traced, as: UTF8.self).split(separator: "\n")
        let requests = lines.filter { $0.contains("command=NBD_CMD_BLOCK_STATUS cookie=") && $0.hasSuffix(" request") }.count
        return (seconds, requests, printed.reduce(0) { $0 + ($1 == UInt8(ascii: "\n") ? 1 : 0) })
    }

    /// User and system CPU time a running process has used, from /proc.
    static func cpuSeconds(of pid: Int32) -> Double {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let close = stat.lastIndex(of: ")")
        else { return 0 }
        // Fields after the command name: state is field 3, utime 14 and stime 15.
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        guard fields.count > 12, let user = Double(fields[11]), let system = Double(fields[12]) else { return 0 }
        return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }
}
