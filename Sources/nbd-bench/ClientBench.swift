// `nbd-bench client`: NBDClient reading a filled `nbdkit memory SIZE` with 1, 2 and 4
// connections, beside `nbdcopy --connections=N --no-extents URI null:` with the same counts in
// the same run; then one read of the whole export with nbdkit killed and started again in the
// middle, and the time that cost.
//
//     swift build -c release && .build/release/nbd-bench client [--size 4G] [--rounds 3]
//
// Each connection has 64 requests of 256 KiB in flight (nbdcopy's defaults), read into
// buffers the tasks reuse, each task on the thread of a connection.
import Foundation
import NBD
import NIOConcurrencyHelpers
import NIOCore

extension Benchmark {
    static func runClient(_ options: Options) async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("nbd-bench-\(getpid())")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let socket = directory.appendingPathComponent("memory.sock").path
        let server = try await startNBDKit(socket: socket, ["memory", "\(options.size)"])
        defer { kill(server.processIdentifier, SIGKILL) }
        let uri = NBDURI(socket: socket)
        print("filling nbdkit memory \(options.size >> 20) MiB with non-zero data ...")
        try await fill(uri, options)

        let mib = Double(options.size) / Double(1 << 20)
        let cores = ProcessInfo.processInfo.activeProcessorCount
        var lines: [String] = []
        for connections in [1, 2, 4] {
            var ours: [Run] = []
            var theirs: [Run] = []
            // nbdkit's CPU time during each run: with the client's, it shows whether the
            // machine's cores, not either program, set the pace.
            var oursServer: [Double] = []
            var theirsServer: [Double] = []
            for _ in 1...options.rounds {
                var serverCPU = cpuSeconds(of: server.processIdentifier)
                ours.append(try await measureSelf { try await readWithClient(uri, options, connections: connections) })
                oursServer.append(cpuSeconds(of: server.processIdentifier) - serverCPU)
                let cpu = cpuSeconds(.children)
                serverCPU = cpuSeconds(of: server.processIdentifier)
                let nbdcopy = try measure(
                    "nbdcopy",
                    ["--connections=\(connections)", "--request-size=262144", "--requests=64", "--no-extents", uri.description, "null:"]
                )
                theirsServer.append(cpuSeconds(of: server.processIdentifier) - serverCPU)
                theirs.append(Run(seconds: nbdcopy.seconds, cpuSeconds: cpuSeconds(.children) - cpu, peakKiB: nbdcopy.peakKiB))
                print("\(connections) connections: NBDClient \(ours.last!), nbdcopy \(theirs.last!)")
            }
            let rate = mib / median(ours.map(\.seconds))
            let theirRate = mib / median(theirs.map(\.seconds))
            for (name, runs, server, value) in [("NBDClient", ours, oursServer, rate), ("nbdcopy", theirs, theirsServer, theirRate)] {
                let busy = (median(runs.map(\.cpuSeconds)) + median(server)) / median(runs.map(\.seconds))
                lines.append(
                    "\(connections) \(name.padding(toLength: 10, withPad: " ", startingAt: 0))"
                        + String(
                            format: "%8.1f MiB/s   CPU %5.2f s   nbdkit CPU %5.2f s   cores busy %4.2f of %d   peak RSS %6.1f MiB%@",
                            value,
                            median(runs.map(\.cpuSeconds)),
                            median(server),
                            busy,
                            cores,
                            Double(runs.map(\.peakKiB).max()!) / 1024,
                            name == "NBDClient" ? String(format: "   ratio to nbdcopy %.2f", rate / theirRate) : ""
                        )
                )
            }
        }
        print("")
        print("read \(Int(mib)) MiB from nbdkit memory, 64 x 256 KiB in flight per connection, Unix socket, median of \(options.rounds)")
        for line in lines { print(line) }
        try await readAcrossARestart(directory: directory, options)
    }

    /// Reads the whole export with `connections`; returns the seconds taken.
    static func readWithClient(_ uri: NBDURI, _ options: Options, connections: Int) async throws -> Double {
        var configuration = NBDClient.Configuration()
        configuration.connections = connections
        configuration.connection.maximumRequestsInFlight = 64
        return try await NBDClient.withClient(uri, configuration: configuration) { client in
            let start = ContinuousClock.now
            try await readAll(
                client,
                tasks: 64 * connections,
                counter: Counter(limit: options.size, step: UInt64(options.requestSize)),
                options
            )
            return (ContinuousClock.now - start) / .seconds(1)
        }
    }

    /// Reads what `counter` hands out from `tasks` tasks, each on a connection's thread with a
    /// buffer it reuses, checking that the data is real (a zero byte would mean a hole was read);
    /// `done` counts the bytes read.
    static func readAll(
        _ client: NBDClient,
        tasks: Int,
        counter: Counter,
        _ options: Options,
        done: NIOLockedValueBox<UInt64> = NIOLockedValueBox(0)
    ) async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            for task in 0..<tasks {
                group.addTask(executorPreference: client.taskExecutor(for: task)) {
                    var buffer = ByteBuffer()
                    buffer.reserveCapacity(options.requestSize)
                    while let offset = counter.next() {
                        buffer.clear()
                        let length = min(UInt64(options.requestSize), options.size - offset)
                        try await client.read(into: &buffer, at: offset, length: length)
                        guard buffer.getInteger(at: 0, as: UInt8.self) != 0 else { throw BenchError("read zeroes at \(offset)") }
                        done.withLockedValue { $0 += length }
                    }
                }
            }
            try await group.waitForAll()
        }
    }

    /// The whole export read once without a restart and once with nbdkit (a file, so that the
    /// data survives) killed at a third of the way and started again 1 s later: the
    /// difference is what the restart cost, the 1 s pause included.
    static func readAcrossARestart(directory: URL, _ options: Options) async throws {
        let file = directory.appendingPathComponent("disk.raw").path
        try writeFilled(file, size: options.size)
        let socket = directory.appendingPathComponent("file.sock").path
        let arguments = ["file", file]
        var server = try await startNBDKit(socket: socket, arguments)
        defer { kill(server.processIdentifier, SIGKILL) }
        let uri = NBDURI(socket: socket)
        var configuration = NBDClient.Configuration()
        configuration.connections = 4
        configuration.reconnectDelay = .seconds(30)
        configuration.connection.maximumRequestsInFlight = 64
        let plain = try await readWithClient(uri, options, connections: 4)
        let client = NBDClient(uri, configuration: configuration)
        let counter = Counter(limit: options.size, step: UInt64(options.requestSize))
        let start = ContinuousClock.now
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await client.run() }
            let done = NIOLockedValueBox<UInt64>(0)
            async let reading: Void = readAll(client, tasks: 256, counter: counter, options, done: done)
            // A third read, not handed out: the kill lands among requests in flight.
            while done.withLockedValue({ $0 }) < options.size / 3 { try await Task.sleep(for: .milliseconds(5)) }
            kill(server.processIdentifier, SIGKILL)
            server.waitUntilExit()
            try? FileManager.default.removeItem(atPath: socket)
            try await Task.sleep(for: .seconds(1))
            server = try await startNBDKit(socket: socket, arguments)
            try await reading
            group.cancelAll()
        }
        let across = (ContinuousClock.now - start) / .seconds(1)
        print("")
        print(
            String(
                format: "read %d MiB from nbdkit file, 4 connections: %.2f s; killed at a third and started again 1 s later: "
                    + "%.2f s (%.2f s lost, the 1 s pause included), %d requests sent again",
                options.size >> 20,
                plain,
                across,
                across - plain,
                client.replays
            )
        )
    }
}
