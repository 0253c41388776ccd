import Foundation
import TestSupport
import Testing

/// The pool simulation (``PoolSimulation``) over thousands of seeds.
@Suite("NBDClient pool simulation")
struct PoolSimulationTests {
    /// Seeds per run: 2,000 (`NBD_SIMULATION_SEEDS` sets another count). `NBD_TEST_SEED=N`
    /// runs seed N alone, to replay a failure.
    static let seedCount = ProcessInfo.processInfo.environment["NBD_SIMULATION_SEEDS"].flatMap { Int($0) } ?? 2000

    @Test func randomSchedulesKeepEveryPromise() {
        let replaying = ProcessInfo.processInfo.environment["NBD_TEST_SEED"] != nil
        let first = testSeed()
        let seeds = replaying ? [first] : (0..<UInt64(Self.seedCount)).map { first &+ $0 }
        var cutShort = 0
        var requestsDone = 0
        for seed in seeds {
            var simulation = PoolSimulation(seed: seed)
            if simulation.run() != nil {
                // Again, the same way, with what happened written down.
                var traced = PoolSimulation(seed: seed, tracing: true)
                Issue.record("seed \(seed) (NBD_TEST_SEED=\(seed) replays it): \(traced.run() ?? "passed when traced")")
                return
            }
            if simulation.cutShort { cutShort += 1 }
            requestsDone += simulation.issued
        }
        // A run cut short (a request lost past the reconnect delay) checks less: few may be.
        #expect(cutShort * 20 <= seeds.count, "\(cutShort) of \(seeds.count) runs cut short (seeds from \(first))")
        print("pool simulation: \(seeds.count) seeds from \(first), \(requestsDone) requests, \(cutShort) cut short")
    }
}
