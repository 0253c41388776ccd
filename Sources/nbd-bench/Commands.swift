import ArgumentParser
import NBD

/// `nbd-bench [BENCHMARK] [options]`: a throughput benchmark by name (the library's read
/// benchmark without one), or `nbd-bench soak`.
@main
struct BenchmarkCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "nbd-bench",
        abstract: "Benchmarks of swift-nbd, each beside the reference tool (nbdcopy, nbdinfo, nbdkit, qemu-nbd) in the same run.",
        subcommands: [Throughput.self, SoakBench.self],
        defaultSubcommand: Throughput.self
    )
}

/// The benchmarks that time one thing beside its reference tool.
struct Throughput: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "run", abstract: "A throughput benchmark (the default).")

    enum Benchmark: String, ExpressibleByArgument, CaseIterable {
        /// The library reading nbdkit memory over one connection, beside nbdcopy (Benchmark.swift).
        case read
        /// nbd copy beside nbdcopy between nbdkit exports.
        case copy
        /// The built-in server beside nbdkit, driven by nbdcopy.
        case server
        /// nbd checksum beside nbdcopy --blkhash (ChecksumBench.swift).
        case checksum
        /// Extended headers against qemu-nbd 10 (ExtendedHeaders.swift).
        case extended
        /// NBDClient with 1, 2 and 4 connections, and a restart (ClientBench.swift).
        case client
        /// nbd info --map of a sparse terabyte (MemoryMap.swift).
        case map
        /// A sparse file copied by nbd copy and nbdcopy (SparseFileBench.swift).
        case sparse
        /// nbd copy onto a write-back server with replay windows of 0, 16M and 64M, beside
        /// nbdcopy (WriteBackBench.swift).
        case writeback
        /// fio's libnbd engine, small random requests, against nbd serve and nbdkit memory
        /// (FioBench.swift).
        case fio
        /// CPU per request of nbd copy and nbdcopy, 4 KiB and 256 KiB, reads and writes, 1 and
        /// 4 connections (RequestsBench.swift).
        case requests
    }

    @Argument(
        help: "Which benchmark: read (the default), copy, server, checksum, extended, client, map, sparse, writeback, fio or requests."
    )
    var benchmark: Benchmark = .read

    @OptionGroup var common: CommonOptions

    func validate() throws {
        if benchmark == .sparse, let size = common.size, size < 2 << 30 {
            throw ValidationError("--size must be at least 2G: 1 GiB of it is data")
        }
    }

    func run() async throws {
        let options = common.options(
            defaultSize: benchmark == .sparse ? 100 << 30 : benchmark == .fio ? 1 << 30 : benchmark == .requests ? 512 << 20 : 4 << 30,
            defaultRequestSize: benchmark == .fio ? 4096 : 256 << 10
        )
        switch benchmark {
        case .read: try await nbd_bench.Benchmark.run(options)
        case .copy: try await nbd_bench.Benchmark.runCopy(options)
        case .server: try await options.tls ? nbd_bench.Benchmark.runServerTLS(options) : nbd_bench.Benchmark.runServer(options)
        case .checksum: try await nbd_bench.Benchmark.runChecksum(options)
        case .extended: try await nbd_bench.Benchmark.runExtended(options)
        case .client: try await nbd_bench.Benchmark.runClient(options)
        case .map: try await nbd_bench.Benchmark.runMemoryMap(options)
        case .sparse: try await nbd_bench.Benchmark.runSparse(options)
        case .writeback: try await nbd_bench.Benchmark.runWriteBack(options)
        case .fio: try await nbd_bench.Benchmark.runFio(options, seconds: common.seconds)
        case .requests: try await nbd_bench.Benchmark.runRequests(options)
        }
    }
}

/// A size with an optional K, M, G or T suffix, as the `nbd` tool takes them.
private func parseSize(_ text: String) throws -> UInt64 {
    guard case .success(let bytes) = ByteCount.parse(text) else {
        throw ValidationError("not a size: \"\(text)\" (use a number of bytes, optionally with K, M, G or T)")
    }
    return bytes
}

/// The options of the throughput benchmarks.
struct CommonOptions: ParsableArguments {
    @Option(help: "Bytes to move (K, M, G, T suffixes; default: the benchmark's own).", transform: parseSize)
    var size: UInt64?

    @Option(help: "Bytes per request (default: 4K for fio, 256K for the others).", transform: parseSize)
    var requestSize: UInt64?

    @Option(help: "Requests in flight per connection.")
    var inFlight = 64

    @Option(help: "Rounds, alternating the tools; medians are printed.")
    var rounds = 3

    @Flag(help: "Over TLS (the read and server benchmarks).")
    var tls = false

    @Option(help: "Seconds per fio run (the fio benchmark).")
    var seconds = 5

    func validate() throws {
        if let requestSize, requestSize == 0 || requestSize > 32 << 20 { throw ValidationError("--request-size must be from 1 to 32M") }
        guard seconds > 0, seconds <= 3600 else { throw ValidationError("--seconds must be from 1 to 3600") }
        guard inFlight > 0, inFlight <= 1024 else { throw ValidationError("--in-flight must be from 1 to 1024") }
        guard rounds > 0, rounds <= 100 else { throw ValidationError("--rounds must be from 1 to 100") }
        if let size, size < requestSize ?? 256 << 10 { throw ValidationError("--size must be at least --request-size") }
    }

    /// The options, with the benchmark's defaults for what was not given.
    func options(defaultSize: UInt64, defaultRequestSize: UInt64) -> nbd_bench.Benchmark.Options {
        nbd_bench.Benchmark.Options(
            size: size ?? defaultSize,
            requestSize: Int(requestSize ?? defaultRequestSize),
            inFlight: inFlight,
            rounds: rounds,
            tls: tls
        )
    }
}

struct SoakBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "soak",
        abstract: "Many clients against nbd serve for a while (see Soak.swift)."
    )

    @Option(help: "Clients, each with its own connection.")
    var clients = 64

    @Option(help: "Requests in flight per client.")
    var inFlight = 64

    @Option(help: "How long to run.")
    var seconds = 60

    @Option(help: "The export's size (K, M, G, T suffixes).", transform: parseSize)
    var size: UInt64 = 1 << 30

    @Option(help: "Drop the server hard and start it again every so many seconds; the clients reconnect.")
    var restartEvery: Double?

    func validate() throws {
        guard clients > 0, clients <= 4096, inFlight > 0, inFlight <= 1024, seconds > 0 else {
            throw ValidationError("--clients (1 to 4096), --in-flight (1 to 1024) and --seconds must be positive")
        }
        if let restartEvery, !(restartEvery > 0) { throw ValidationError("--restart-every takes a number of seconds") }
    }

    func run() async throws {
        try await Soak.run(Soak.Options(clients: clients, inFlight: inFlight, seconds: seconds, size: size, restartEvery: restartEvery))
    }
}
