// `nbd-bench sparse`: a sparse file as the source of a copy. A file of SIZE (default 100 GiB)
// holding 1 GiB of data in 1 MiB pieces scattered at random, copied by `nbd copy` and by
// `nbdcopy` (both with their defaults) to null:, to an `nbdkit memory` export and to a new
// file, alternating, with the page cache dropped before each run when the benchmark may (as
// root). Prints each median, the ratio, CPU time, peak RSS, and the blocks each destination
// file holds: a copy that wrote the holes as zeroes would show 100 GiB there.
//
//     swift build -c release --product nbd && swift build -c release --product nbd-bench
//     .build/release/nbd-bench sparse [--size 100G] [--rounds 3]
import Foundation
import NBD
import NBDSystem

extension Benchmark {
    static func runSparse(_ options: Options) async throws {
        let tool = try requireNBDTool()
        let size = options.size
        guard size >= 2 << 30 else { throw BenchError("--size must be at least 2G: 1 GiB of it is data") }
        // Beside the build, not in /tmp: a tmpfs there would hold the data in memory.
        let directory = URL(fileURLWithPath: FileManager.default.currentDirectoryPath).appendingPathComponent(".nbd-bench-\(getpid())")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let source = directory.appendingPathComponent("source.raw").path
        try writeScattered(source, size: size)
        let socket = directory.appendingPathComponent("memory.sock").path
        let server = try await startNBDKit(socket: socket, ["memory", "\(size)"])
        defer { kill(server.processIdentifier, SIGKILL) }
        let memory = NBDURI(socket: socket).description
        let destination = directory.appendingPathComponent("copy.raw").path
        let dropsCache = FileManager.default.isWritableFile(atPath: "/proc/sys/vm/drop_caches")
        print(
            "source: \(size >> 30) GiB sparse file, 1 GiB of data in 1024 pieces; page cache "
                + (dropsCache ? "dropped before each run" : "not dropped (not root)")
        )
        let cases: [(String, String)] = [("null:", "null:"), ("nbdkit memory", memory), ("a new file", destination)]
        for (name, target) in cases {
            var ours: [Run] = []
            var theirs: [Run] = []
            var allocated: [String: UInt64] = [:]
            for _ in 1...options.rounds {
                for (who, program, arguments) in [("nbd copy", tool, ["copy", source, target]), ("nbdcopy", "nbdcopy", [source, target])] {
                    try? FileManager.default.removeItem(atPath: destination)
                    if dropsCache {
                        sync()
                        try Data("3\n".utf8).write(to: URL(fileURLWithPath: "/proc/sys/vm/drop_caches"))
                    }
                    let cpu = cpuSeconds(.children)
                    let run = try measure(program, arguments)
                    let measured = Run(seconds: run.seconds, cpuSeconds: cpuSeconds(.children) - cpu, peakKiB: run.peakKiB)
                    if who == "nbdcopy" { theirs.append(measured) } else { ours.append(measured) }
                    if target == destination { allocated[who] = try LocalFile(path: destination, access: .read).allocatedBytes() }
                }
            }
            let ourTime = median(ours.map(\.seconds))
            let theirTime = median(theirs.map(\.seconds))
            print(
                "to \(name.padding(toLength: 14, withPad: " ", startingAt: 0))"
                    + String(
                        format: "nbd copy %6.2f s (CPU %5.2f s, %3d MiB)   nbdcopy %6.2f s (CPU %5.2f s, %3d MiB)   ratio %.2f",
                        ourTime,
                        median(ours.map(\.cpuSeconds)),
                        ours.map(\.peakKiB).max()! >> 10,
                        theirTime,
                        median(theirs.map(\.cpuSeconds)),
                        theirs.map(\.peakKiB).max()! >> 10,
                        theirTime / ourTime
                    )
                    + (allocated.isEmpty
                        ? ""
                        : "   allocated: nbd copy \(allocated["nbd copy"]! >> 20) MiB, nbdcopy \(allocated["nbdcopy"]! >> 20) MiB")
            )
        }
    }

    /// A sparse file of `size` with 1024 pieces of 1 MiB of non-zero data at random places.
    static func writeScattered(_ path: String, size: UInt64) throws {
        guard FileManager.default.createFile(atPath: path, contents: nil) else { throw BenchError("cannot create \(path)") }
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        defer { try? handle.close() }
        try handle.truncate(atOffset: size)
        let piece = Data((0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 % 251 + 1) })
        var generator = SystemRandomNumberGenerator()
        let slots = Array(0..<Int(size >> 20)).shuffled(using: &generator).prefix(1024).sorted()
        for slot in slots {
            try handle.seek(toOffset: UInt64(slot) << 20)
            try handle.write(contentsOf: piece)
        }
        try handle.synchronize()
    }
}
