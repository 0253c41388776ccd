// `nbd-bench checksum`: `nbd checksum` beside `nbdcopy --blkhash -- URI null:` from libnbd 1.24
// (the Debian sid chroot of `scripts/chroot.sh sid`), on `nbdkit sparse-random 16G` and on a
// filled `nbdkit memory SIZE`, same run, alternating, median of the rounds; both print the same
// digest or the run fails.
//
//     swift build -c release && .build/release/nbd-bench checksum [--size 4G] [--rounds 3]
import Foundation
import NBD

extension Benchmark {
    static func runChecksum(_ options: Options) async throws {
        let tool = try requireNBDTool()
        let sid = try Chroot("sid", holding: "nbdcopy")
        defer { try? FileManager.default.removeItem(atPath: sid.hostDirectory) }
        var servers: [Process] = []
        defer { for server in servers { kill(server.processIdentifier, SIGKILL) } }
        // Each server on a socket in the chroot's /tmp: the host reaches it there, nbdcopy here.
        func serve(_ name: String, _ plugin: [String]) async throws -> (host: String, chroot: String) {
            servers.append(try await startNBDKit(socket: "\(sid.hostDirectory)/\(name).sock", plugin))
            return (
                NBDURI(socket: "\(sid.hostDirectory)/\(name).sock").description, NBDURI(socket: "\(sid.directory)/\(name).sock").description
            )
        }
        let sparse = try await serve("sparse", ["sparse-random", "16G"])
        let memory = try await serve("memory", ["memory", "\(options.size)"])
        print("filling nbdkit memory \(options.size >> 20) MiB with non-zero data ...")
        try await fill(try NBDURI(memory.host), options)

        print("")
        print("nbd checksum beside nbdcopy 1.24 --blkhash (sha256/64K), median of \(options.rounds)")
        for (name, uris, bytes) in [
            ("sparse-random 16G", sparse, UInt64(16 << 30)), ("memory \(options.size >> 20)M, filled", memory, options.size),
        ] {
            var ours: [Run] = []
            var theirs: [Run] = []
            for _ in 0..<options.rounds {
                let (ourRun, ourDigest) = try measureOutput(tool, ["checksum", uris.host])
                let (theirRun, theirDigest) = try measureOutput(
                    "/usr/sbin/chroot",
                    sid.command("nbdcopy", ["--blkhash", "--", uris.chroot, "null:"])
                )
                guard ourDigest.split(separator: " ").first.map(String.init) == theirDigest.trimmingCharacters(in: .whitespacesAndNewlines)
                else {
                    throw BenchError("the digests differ: nbd checksum \(ourDigest), nbdcopy \(theirDigest)")
                }
                ours.append(ourRun)
                theirs.append(theirRun)
            }
            let mib = Double(bytes) / Double(1 << 20)
            let ourRate = mib / median(ours.map(\.seconds))
            let theirRate = mib / median(theirs.map(\.seconds))
            print(
                name.padding(toLength: 22, withPad: " ", startingAt: 0)
                    + String(
                        format: "nbd checksum %8.1f MiB/s (CPU %5.2f s, %4d MiB)   nbdcopy %8.1f MiB/s (CPU %5.2f s, %4d MiB)   ratio %.2f",
                        ourRate,
                        median(ours.map(\.cpuSeconds)),
                        ours.map(\.peakKiB).max()! >> 10,
                        theirRate,
                        median(theirs.map(\.cpuSeconds)),
                        theirs.map(\.peakKiB).max()! >> 10,
                        ourRate / theirRate
                    )
            )
        }
    }

    /// Runs a tool to the end: its time, CPU time and peak RSS, and what it printed.
    static func measureOutput(_ tool: String, _ arguments: [String]) throws -> (Run, String) {
        let output = FileManager.default.temporaryDirectory.appendingPathComponent("nbd-bench-\(getpid())-output")
        guard FileManager.default.createFile(atPath: output.path, contents: nil) else { throw BenchError("cannot create \(output.path)") }
        defer { try? FileManager.default.removeItem(at: output) }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: tool)
        process.arguments = arguments
        process.standardOutput = try FileHandle(forWritingTo: output)
        process.standardError = FileHandle.nullDevice
        let cpu = cpuSeconds(.children)
        let start = Date()
        try process.run()
        var peak = 0
        while process.isRunning {
            peak = max(peak, peakMemory(of: "\(process.processIdentifier)"))
            usleep(20_000)
        }
        let seconds = Date().timeIntervalSince(start)
        guard process.terminationStatus == 0 else { throw BenchError("\(tool) \(arguments.joined(separator: " ")) failed") }
        let run = Run(seconds: seconds, cpuSeconds: cpuSeconds(.children) - cpu, peakKiB: peak)
        return (run, try String(contentsOf: output, encoding: .utf8))
    }
}
