import Foundation

/// The same numbers for the same seed, run after run (SplitMix64).
public struct SeededGenerator: RandomNumberGenerator {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var value = state
        value = (value ^ (value >> 30)) &* 0xBF58_476D_1CE4_E5B9
        value = (value ^ (value >> 27)) &* 0x94D0_49BB_1331_11EB
        return value ^ (value >> 31)
    }
}

/// The seed of a test's random inputs: `NBD_TEST_SEED` when set, to replay a failure, else a new
/// one. A test prints it in its failure messages, so any failure can be run again as it was.
public func testSeed() -> UInt64 {
    ProcessInfo.processInfo.environment["NBD_TEST_SEED"].flatMap { UInt64($0) } ?? UInt64.random(in: 0...UInt64.max)
}
