// `nbd-bench requests`: what one request costs, `nbd copy` beside nbdcopy given the same
// request size, connections and requests in flight, in the same run.
//
//     swift build -c release && .build/release/nbd-bench requests [--size 512M] [--rounds 5] [--in-flight 64]
//
// Reads copy a filled `nbdkit memory SIZE` to null:; writes copy a file of SIZE in the
// temporary directory (in the page cache once written, so that no disk sets the pace) to a
// second `nbdkit memory SIZE`. For
// 4 KiB and 256 KiB requests, 1 and 4 connections, the tools alternate round by round; each
// row prints the medians of user and system CPU per request, requests per second and the
// peak RSS, ours over theirs. nbdcopy is given --no-extents: the block status our copy asks
// for, once a gibibyte, is not worth a flag.
import Foundation
import NBD

#if canImport(Glibc)
import Glibc
#endif

extension Benchmark {
    static func runRequests(_ options: Options) async throws {
        let tool = try requireNBDTool()
        let servers = try NBDKitServers()
        defer { servers.stop() }
        let source = try await servers.serve("source", ["memory", "\(options.size)"])
        let destination = try await servers.serve("destination", ["memory", "\(options.size)"])
        print("filling nbdkit memory \(options.size >> 20) MiB and a file of as much with non-zero data ...")
        try await fill(source, options)
        let file = servers.directory.appendingPathComponent("source.raw").path
        _ = try measure("nbdcopy", [source.description, file])
        // Once untimed, so that nbdkit allocates the destination's pages before any timed run.
        _ = try measure("nbdcopy", [file, destination.description])

        var rows: [String] = []
        for requestSize in [4 << 10, 256 << 10] {
            for (direction, from, to) in [("read", source.description, "null:"), ("write", file, destination.description)] {
                for connections in [1, 4] {
                    var ours: [Sample] = []
                    var theirs: [Sample] = []
                    for _ in 0..<options.rounds {
                        ours.append(
                            try sample(
                                tool,
                                [
                                    "copy", "--connections", "\(connections)", "--request-size", "\(requestSize)", "--requests",
                                    "\(options.inFlight)", from, to,
                                ]
                            )
                        )
                        theirs.append(
                            try sample(
                                "nbdcopy",
                                [
                                    "--connections=\(connections)", "--request-size=\(requestSize)", "--requests=\(options.inFlight)",
                                    "--no-extents", from, to,
                                ]
                            )
                        )
                    }
                    let count = Double(options.size) / Double(requestSize)
                    let our = Sample.median(ours)
                    let their = Sample.median(theirs)
                    let row = String(
                        format: "%4d KiB %-5@ %d conn  µs user %5.2f / %5.2f  sys %5.2f / %5.2f  CPU %5.2f / %5.2f = %.2f"
                            + "  req/s %7.0f / %7.0f = %.2f  peak %3d / %3d MiB",
                        requestSize >> 10,
                        direction,
                        connections,
                        our.user / count * 1e6,
                        their.user / count * 1e6,
                        our.system / count * 1e6,
                        their.system / count * 1e6,
                        (our.user + our.system) / count * 1e6,
                        (their.user + their.system) / count * 1e6,
                        (our.user + our.system) / (their.user + their.system),
                        count / our.seconds,
                        count / their.seconds,
                        their.seconds / our.seconds,
                        our.peakKiB >> 10,
                        their.peakKiB >> 10
                    )
                    print(row)
                    rows.append(row)
                }
            }
        }
        print("")
        print(
            "per request, nbd copy / nbdcopy, \(options.size >> 20) MiB, \(options.inFlight) requests in flight per connection, "
                + "Unix socket, median of \(options.rounds) alternating rounds (req/s ratio: ours over theirs)"
        )
        for row in rows { print(row) }
    }

    /// One run of a tool: wall clock, its user and system CPU time, its peak memory.
    struct Sample {
        var seconds: Double
        var user: Double
        var system: Double
        var peakKiB: Int

        /// Each figure's median over `samples` (the peak: the largest).
        static func median(_ samples: [Sample]) -> Sample {
            Sample(
                seconds: Benchmark.median(samples.map(\.seconds)),
                user: Benchmark.median(samples.map(\.user)),
                system: Benchmark.median(samples.map(\.system)),
                peakKiB: samples.map(\.peakKiB).max() ?? 0
            )
        }
    }

    static func sample(_ tool: String, _ arguments: [String]) throws -> Sample {
        let before = cpuTimes(.children)
        let run = try measure(tool, arguments)
        let after = cpuTimes(.children)
        return Sample(seconds: run.seconds, user: after.user - before.user, system: after.system - before.system, peakKiB: run.peakKiB)
    }
}
