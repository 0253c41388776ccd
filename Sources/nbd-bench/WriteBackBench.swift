import Foundation
import NBD

// `writeback`: what the replay log costs. `nbd copy --flush --reconnect-delay 20` of SIZE
// (4 GiB) from nbdkit's pattern plugin onto nbdkit memory behind its cache filter in write-back
// mode (every write answered waits in the cache until a flush: what the replay log exists
// for), with `--replay-window` at 0 (nothing kept), 16M and 64M (the default), beside
// `nbdcopy --flush` on the same servers, rounds alternating. It prints each one's rate, CPU
// time and peak RSS, the ratio to nbdcopy, and the log's cost: how much slower 16M and 64M
// copy than 0.
extension Benchmark {
    static func runWriteBack(_ options: Options) async throws {
        let tool = try requireNBDTool()
        let servers = try NBDKitServers()
        defer { servers.stop() }
        let source = try await servers.serve("pattern", ["pattern", "\(options.size)"]).description
        let destination = try await servers.serve(
            "writeback",
            ["--filter=cache", "memory", "\(options.size)", "cache=writeback"]
        ).description
        // Once untimed: the memory plugin and the cache allocate their pages here, not in
        // whichever timed run comes first.
        _ = try measure("nbdcopy", ["--flush", source, destination])

        let ours = { (window: String) in ["copy", "--flush", "--reconnect-delay", "20", "--replay-window", window, source, destination] }
        let cases: [(name: String, tool: String, arguments: [String])] = [
            ("nbdcopy --flush", "nbdcopy", ["--flush", source, destination]),
            ("nbd copy, window 0", tool, ours("0")),
            ("nbd copy, window 16M", tool, ours("16M")),
            ("nbd copy, window 64M", tool, ours("64M")),
        ]
        var runs = Array(repeating: [Run](), count: cases.count)
        let mib = Double(options.size) / Double(1 << 20)
        print("\(Int(mib)) MiB from nbdkit pattern onto nbdkit memory with --filter=cache cache=writeback, \(options.rounds) rounds")
        for round in 1...options.rounds {
            for (index, copy) in cases.enumerated() {
                let cpu = cpuSeconds(.children)
                let (seconds, peakKiB) = try measure(copy.tool, copy.arguments)
                runs[index].append(Run(seconds: seconds, cpuSeconds: cpuSeconds(.children) - cpu, peakKiB: peakKiB))
                print("round \(round): \(copy.name): \(runs[index].last!)")
            }
        }
        print("")
        let rates = runs.map { mib / median($0.map(\.seconds)) }
        for (index, copy) in cases.enumerated() {
            print(
                copy.name.padding(toLength: 24, withPad: " ", startingAt: 0)
                    + String(
                        format: "%8.1f MiB/s   CPU %5.2f s   peak RSS %5d MiB   ratio to nbdcopy %.2f",
                        rates[index],
                        median(runs[index].map(\.cpuSeconds)),
                        runs[index].map(\.peakKiB).max()! >> 10,
                        rates[index] / rates[0]
                    )
            )
        }
        for index in 2..<cases.count {
            let cost = 100 * (1 - rates[index] / rates[1])
            print("the replay log costs \(String(format: "%.1f", cost)) % of the rate in \(cases[index].name) (beside window 0)")
        }
    }
}
