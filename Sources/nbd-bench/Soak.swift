import Foundation
import NBD
import NBDServer
import NIOConcurrencyHelpers
import NIOCore

/// `nbd-bench soak`: many clients, each with many requests in flight, doing random reads,
/// writes, zeroes and trims against `nbd serve` for a set time. Every byte read is checked
/// against a model of what was written. Not a test: a long run that prints what it did and
/// the peak memory of both sides, and fails if a byte or a request was wrong.
///
///     nbd-bench soak [--clients 64] [--in-flight 64] [--seconds 60] [--size 1G] [--restart-every SECONDS]
///
/// With `--restart-every`, the clients are `NBDClient`s with a reconnect delay, and the server
/// runs in this process: every so many seconds it is stopped hard (every connection dropped,
/// requests in flight unanswered) and started again on the same socket with the same memory
/// backend. The clients must ride it out: no failed request, no block read wrong.
enum Soak {
    struct Options {
        var clients = 64
        var inFlight = 64
        var seconds = 60
        var size: UInt64 = 1 << 30
        var restartEvery: Double?
    }

    /// What all the workers did.
    final class Tally: Sendable {
        struct Counts {
            var operations = 0, bytesRead: UInt64 = 0, bytesWritten: UInt64 = 0, errors = 0, wrongBlocks = 0
            var firstProblem: String?
        }
        let counts = NIOLockedValueBox(Counts())
    }

    static let block = 4096

    static func run(_ options: Options) async throws {
        let slots = options.clients * options.inFlight
        guard options.size / UInt64(slots) / UInt64(block) >= 16 else {
            throw BenchError("--size is too small for \(slots) workers of 16 blocks each")
        }
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("nbd-soak-\(getpid())")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let socket = directory.appendingPathComponent("serve.sock").path
        let tally = Tally()
        let elapsed: Duration
        let serverPeak: Int
        if let restartEvery = options.restartEvery {
            (elapsed, serverPeak) = try await runRestarting(options, socket: socket, every: restartEvery, tally: tally)
        } else {
            // The server in its own process, so that its peak memory is its own.
            let server = try Benchmark.start(try Benchmark.requireNBDTool(), ["serve", "--memory", "\(options.size)", "--socket", socket])
            defer { kill(server.processIdentifier, SIGKILL) }
            try await Benchmark.waitFor(socket)
            var exports: [NBDExport] = []
            for _ in 0..<options.clients { exports.append(try await NBDExport.connect(to: NBDURI(socket: socket))) }
            print(
                "soak: \(options.clients) clients x \(options.inFlight) in flight against nbd serve --memory \(options.size >> 20)M, "
                    + "\(options.seconds) s, random reads, writes, zeroes and trims of 4 KiB to 64 KiB"
            )
            let started = ContinuousClock.now
            try await work(options, clients: exports, tally: tally)
            elapsed = ContinuousClock.now - started
            for export in exports { await export.disconnect() }
            serverPeak = Benchmark.peakMemory(of: "\(server.processIdentifier)")
        }
        let counts = tally.counts.withLockedValue { $0 }
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        let clientPeak = Benchmark.peakMemory(of: "self")
        print(String(format: "operations %d (%.0f/s)", counts.operations, Double(counts.operations) / seconds))
        print(
            String(format: "read %.1f MiB, written %.1f MiB", Double(counts.bytesRead) / 1_048_576, Double(counts.bytesWritten) / 1_048_576)
        )
        print("failed requests \(counts.errors), blocks read wrong \(counts.wrongBlocks)")
        if options.restartEvery == nil {
            print(String(format: "peak RSS: server %.1f MiB, client %.1f MiB", Double(serverPeak) / 1024, Double(clientPeak) / 1024))
        } else {
            print(String(format: "peak RSS: server and clients in one process %.1f MiB", Double(clientPeak) / 1024))
        }
        if let problem = counts.firstProblem { throw BenchError("the soak went wrong: \(problem)") }
    }

    /// Every slot's worker, until the time is up.
    static func work(_ options: Options, clients: [any NBDExportAccess], tally: Tally) async throws {
        let slots = options.clients * options.inFlight
        let slotBlocks = Int(options.size / UInt64(slots) / UInt64(block))
        let deadline = ContinuousClock.now + .seconds(options.seconds)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for slot in 0..<slots {
                let client = clients[slot % clients.count]
                group.addTask(executorPreference: client.taskExecutor(for: 0)) {
                    var worker = Worker(export: client, firstBlock: slot * slotBlocks, blocks: slotBlocks, seed: UInt64(slot) + 1)
                    while ContinuousClock.now < deadline { await worker.step(tally) }
                }
            }
            try await group.waitForAll()
        }
    }

    /// The soak against a server in this process, stopped hard and started again on the same
    /// socket and backend every `every` seconds, the clients riding it out.
    static func runRestarting(_ options: Options, socket: String, every: Double, tally: Tally) async throws -> (Duration, Int) {
        let backend = MemoryBackend(size: options.size)
        let export = NBDServerExport(backend: backend)
        var server = try await NBDServer.start(exports: [export], on: .unix(path: socket))
        var configuration = NBDClient.Configuration()
        configuration.connections = 1
        configuration.reconnectDelay = .seconds(30)
        configuration.connection.maximumRequestsInFlight = options.inFlight
        let clients = (0..<options.clients).map { _ in NBDClient(NBDURI(socket: socket), configuration: configuration) }
        print(
            "soak: \(options.clients) NBDClients x \(options.inFlight) in flight against NBDServer on memory \(options.size >> 20)M, "
                + "\(options.seconds) s, the server stopped hard and started again every \(every) s"
        )
        var restarts = 0
        let started = ContinuousClock.now
        try await withThrowingTaskGroup(of: Void.self) { group in
            for client in clients { group.addTask { try await client.run() } }
            let deadline = started + .seconds(options.seconds)
            let working = Task { try await work(options, clients: clients, tally: tally) }
            while ContinuousClock.now + .milliseconds(Int64(every * 1000)) < deadline {
                try await Task.sleep(for: .milliseconds(Int64(every * 1000)))
                await server.close()
                try? FileManager.default.removeItem(atPath: socket)
                server = try await NBDServer.start(exports: [export], on: .unix(path: socket))
                restarts += 1
            }
            try await working.value
            group.cancelAll()
        }
        let elapsed = ContinuousClock.now - started
        await server.shutdown()
        print("restarts \(restarts), requests sent again \(clients.reduce(0) { $0 + $1.replays })")
        // The server ran in this process: its memory is in the client's figure.
        return (elapsed, 0)
    }

    /// One slot of the export, its own: requests on it run one at a time, so a model of each
    /// block says what a read must return.
    struct Worker {
        enum Expected: Equatable {
            case zero
            /// Written by the write numbered so.
            case written(UInt32)
            /// Trimmed: "may read back as anything" until written.
            case unknown
        }

        let export: any NBDExportAccess
        let firstBlock: Int
        var model: [Expected]
        var generator: UInt64
        var writes: UInt32 = 0

        init(export: any NBDExportAccess, firstBlock: Int, blocks: Int, seed: UInt64) {
            self.export = export
            self.firstBlock = firstBlock
            model = Array(repeating: .zero, count: blocks)
            generator = seed
        }

        mutating func random(_ bound: Int) -> Int {
            generator &+= 0x9E37_79B9_7F4A_7C15
            var z = generator
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return Int((z ^ (z >> 31)) % UInt64(bound))
        }

        mutating func step(_ tally: Tally) async {
            let count = 1 + random(16)
            let start = random(model.count - count + 1)
            let offset = UInt64(firstBlock + start) * UInt64(Soak.block)
            let length = UInt64(count * Soak.block)
            let choice = random(100)
            do {
                if choice < 40 {
                    let data = try await export.read(at: offset, length: length, flags: [])
                    var wrong = 0
                    for index in 0..<count where model[start + index] != .unknown {
                        let expected = Soak.content(of: firstBlock + start + index, model[start + index])
                        if data.getSlice(at: index * Soak.block, length: Soak.block) != expected { wrong += 1 }
                    }
                    tally.counts.withLockedValue { counts in
                        counts.operations += 1
                        counts.bytesRead += length
                        counts.wrongBlocks += wrong
                        if wrong > 0, counts.firstProblem == nil { counts.firstProblem = "\(wrong) blocks read wrong at offset \(offset)" }
                    }
                    return
                }
                if choice < 75 {
                    writes &+= 1
                    var data = ByteBuffer()
                    for index in 0..<count {
                        var block = Soak.content(of: firstBlock + start + index, .written(writes))
                        data.writeBuffer(&block)
                    }
                    try await export.write(data, at: offset, flags: [])
                    for index in 0..<count { model[start + index] = .written(writes) }
                } else if choice < 90 {
                    try await export.writeZeroes(at: offset, length: length, flags: [])
                    for index in 0..<count { model[start + index] = .zero }
                } else {
                    try await export.trim(at: offset, length: length, flags: [])
                    for index in 0..<count { model[start + index] = .unknown }
                }
                tally.counts.withLockedValue { counts in
                    counts.operations += 1
                    if choice < 75 { counts.bytesWritten += length }
                }
            } catch {
                // The block's state is unknown after a failed request.
                for index in 0..<count { model[start + index] = .unknown }
                tally.counts.withLockedValue { counts in
                    counts.errors += 1
                    if counts.firstProblem == nil { counts.firstProblem = "a request failed: \(error)" }
                }
            }
        }
    }

    /// What block `index` holds in `state`: zeroes, or words made of the write's number and the
    /// block's, so that a block read from the wrong place or the wrong time shows.
    static func content(of index: Int, _ state: Worker.Expected) -> ByteBuffer {
        var buffer = ByteBuffer()
        guard case .written(let generation) = state else {
            buffer.writeRepeatingByte(0, count: block)
            return buffer
        }
        let seed = UInt64(generation) << 40 ^ UInt64(index) << 12
        buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: block) { raw in
            for word in 0..<(block / 8) { raw.storeBytes(of: (seed | UInt64(word)).bigEndian, toByteOffset: word * 8, as: UInt64.self) }
            return block
        }
        return buffer
    }
}
