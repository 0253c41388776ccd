import Foundation
import NIOConcurrencyHelpers
import TestSupport
import Testing

/// The pool simulation (``PoolSimulation``) over thousands of seeds.
@Suite("NBDClient pool simulation")
struct PoolSimulationTests {
    /// Seeds per run: 2,000 (`NBD_SIMULATION_SEEDS` sets another count). `NBD_TEST_SEED=N`
    /// runs seed N alone, to replay a failure.
    static let seedCount = ProcessInfo.processInfo.environment["NBD_SIMULATION_SEEDS"].flatMap { Int($0) } ?? 2000

    @Test func randomSchedulesKeepEveryPromise() async {
        let replaying = ProcessInfo.processInfo.environment["NBD_TEST_SEED"] != nil
        let first = testSeed()
        let seeds = replaying ? [first] : (0..<UInt64(Self.seedCount)).map { first &+ $0 }
        // The seeds shared among one thread per processor, threads of their own: half a
        // minute of work on Swift's cooperative threads would starve the tests beside it.
        let workers = max(1, min(ProcessInfo.processInfo.activeProcessorCount, seeds.count))
        let results = await withCheckedContinuation { continuation in
            let finished = NIOLockedValueBox<[Outcome]>([])
            for worker in 0..<workers {
                Thread {
                    let outcome = Self.run(stride(from: worker, to: seeds.count, by: workers).map { seeds[$0] })
                    let all = finished.withLockedValue { done in
                        done.append(outcome)
                        return done.count == workers ? done : nil
                    }
                    if let all { continuation.resume(returning: all) }
                }.start()
            }
        }
        if let seed = results.compactMap(\.failedSeed).min() {
            // Again, the same way, with what happened written down.
            var traced = PoolSimulation(seed: seed, tracing: true)
            Issue.record("seed \(seed) (NBD_TEST_SEED=\(seed) replays it): \(traced.run() ?? "passed when traced")")
            return
        }
        let cutShort = results.reduce(0) { $0 + $1.cutShort }
        let requests = results.reduce(0) { $0 + $1.requests }
        // A run cut short (a request lost past the reconnect delay) checks less: few may be.
        #expect(cutShort * 20 <= seeds.count, "\(cutShort) of \(seeds.count) runs cut short (seeds from \(first))")
        print("pool simulation: \(seeds.count) seeds from \(first), \(requests) requests, \(cutShort) cut short")
    }

    struct Outcome {
        var failedSeed: UInt64?
        var cutShort = 0
        var requests = 0
    }

    /// Runs `seeds` one after another, up to the first that fails.
    static func run(_ seeds: [UInt64]) -> Outcome {
        var outcome = Outcome()
        for seed in seeds {
            var simulation = PoolSimulation(seed: seed)
            if simulation.run() != nil {
                outcome.failedSeed = seed
                return outcome
            }
            if simulation.cutShort { outcome.cutShort += 1 }
            outcome.requests += simulation.issued
        }
        return outcome
    }
}
