import Foundation
import NBD

/// `nbd-bench fio`: fio's libnbd engine (`--ioengine=nbd`), 4 KiB random reads and writes, 64
/// in flight on one connection, against `nbd serve --memory` and `nbdkit memory` in interleaved
/// rounds (who goes first alternates). Prints, per workload, the median IOPS of each and their
/// ratio, and each server's CPU time (user + system, from /proc) per 100k requests.
extension Benchmark {
    /// One fio run against one server.
    struct FioRun {
        var iops: Double
        /// The server's CPU seconds per 100k requests.
        var cpuPer100k: Double
    }

    static func runFio(_ options: Options, seconds: Int) async throws {
        let fio = try requireFio()
        let servers = try NBDKitServers()
        defer { servers.stop() }
        let ourSocket = servers.directory.appendingPathComponent("ours.sock").path
        let ours = try start(try requireNBDTool(), ["serve", "--memory", "\(options.size)", "--socket", ourSocket])
        defer { kill(ours.processIdentifier, SIGKILL) }
        try await waitFor(ourSocket)
        let theirSocket = servers.directory.appendingPathComponent("nbdkit.sock").path
        let nbdkit = try await startNBDKit(socket: theirSocket, ["memory", "\(options.size)"])
        defer { kill(nbdkit.processIdentifier, SIGKILL) }
        let targets = [
            (name: "nbd serve", uri: NBDURI(socket: ourSocket).description, pid: ours.processIdentifier),
            (name: "nbdkit", uri: NBDURI(socket: theirSocket).description, pid: nbdkit.processIdentifier),
        ]
        // Both filled first, so that reads find data, not holes.
        for target in targets {
            _ = try fioRun(fio, target.uri, "write", blockSize: 1 << 20, depth: 16, options: options, seconds: nil)
        }
        let size = options.requestSize
        print(
            "fio --ioengine=nbd, \(size >> 10) KiB random, \(options.inFlight) in flight, one connection, \(seconds) s per run, "
                + "median of \(options.rounds) interleaved rounds; server CPU (user + system) per 100k requests"
        )
        for workload in ["randread", "randwrite"] {
            var runs: [[FioRun]] = [[], []]
            for round in 0..<options.rounds {
                for index in (round % 2 == 0 ? [0, 1] : [1, 0]) {
                    let before = cpuSeconds(of: targets[index].pid)
                    let (iops, requests) = try fioRun(
                        fio,
                        targets[index].uri,
                        workload,
                        blockSize: size,
                        depth: options.inFlight,
                        options: options,
                        seconds: seconds
                    )
                    let cpu = cpuSeconds(of: targets[index].pid) - before
                    runs[index].append(FioRun(iops: iops, cpuPer100k: cpu / Double(max(1, requests)) * 1e5))
                }
            }
            let ourIOPS = median(runs[0].map(\.iops))
            let theirIOPS = median(runs[1].map(\.iops))
            let ourCPU = median(runs[0].map(\.cpuPer100k))
            let theirCPU = median(runs[1].map(\.cpuPer100k))
            print(
                workload.padding(toLength: 10, withPad: " ", startingAt: 0)
                    + String(
                        format:
                            "nbd serve %8.0f IOPS, CPU %.2f s/100k   nbdkit %8.0f IOPS, CPU %.2f s/100k   IOPS ratio %.2f, CPU ratio %.2f",
                        ourIOPS,
                        ourCPU,
                        theirIOPS,
                        theirCPU,
                        ourIOPS / theirIOPS,
                        ourCPU / theirCPU
                    )
            )
            print("          rounds: nbd serve \(runs[0].map { Int($0.iops) }), nbdkit \(runs[1].map { Int($0.iops) })")
        }
    }

    /// fio, or a message that names its package.
    static func requireFio() throws -> String {
        for directory in ["/usr/bin", "/usr/local/bin"] where FileManager.default.isExecutableFile(atPath: "\(directory)/fio") {
            return "\(directory)/fio"
        }
        throw BenchError("fio is missing: apt-get install fio (its nbd engine is libnbd's)")
    }

    /// Runs fio once; its IOPS and the requests it made. Without `seconds`, one pass over the
    /// whole export.
    static func fioRun(
        _ fio: String,
        _ uri: String,
        _ workload: String,
        blockSize: Int,
        depth: Int,
        options: Options,
        seconds: Int?
    ) throws -> (iops: Double, requests: Int) {
        var arguments = [
            "--name=bench", "--ioengine=nbd", "--uri=\(uri)", "--rw=\(workload)", "--bs=\(blockSize)", "--iodepth=\(depth)",
            "--numjobs=1", "--size=\(options.size)", "--output-format=json",
        ]
        if let seconds { arguments += ["--time_based", "--runtime=\(seconds)", "--randrepeat=0"] }
        let (status, printed, _) = try runCollecting(fio, arguments)
        // The engine says "fio: connected to NBD server" on standard output before the JSON.
        let data = printed.drop { $0 != UInt8(ascii: "{") }
        guard status == 0,
            let json = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
            let job = (json["jobs"] as? [[String: Any]])?.first
        else {
            throw BenchError("fio \(workload) against \(uri) failed (status \(status))")
        }
        let side = job[workload.contains("read") ? "read" : "write"] as? [String: Any] ?? [:]
        return ((side["iops"] as? Double) ?? 0, (side["total_ios"] as? Int) ?? 0)
    }
}
