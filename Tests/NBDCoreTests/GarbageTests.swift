import NIOCore
import TestSupport
import Testing

@_spi(NBDMachines) @testable import NBDCore

/// Random bytes from a hostile server never crash the parsers, and each ends the right way:
/// in a wait for more, or in a typed error that closes the connection and fails every request
/// once, with nothing delivered outside what was asked for. The inputs come from a seed that
/// every failure prints (`NBD_TEST_SEED=N` replays it).
@Suite("Garbage in")
struct GarbageTests {
    /// Mostly valid prefixes with random tails, so the parsers get past their magics.
    func garbage(_ generator: inout SeededGenerator, prefix: [UInt8]) -> [UInt8] {
        let count = Int.random(in: 0...64, using: &generator)
        return prefix.prefix(Int.random(in: 0...prefix.count, using: &generator))
            + (0..<count).map { _ in UInt8.random(in: 0...255, using: &generator) }
    }

    @Test func negotiationSurvivesGarbage() {
        let seed = testSeed()
        var generator = SeededGenerator(seed: seed)
        let greeting = hex("4e42444d41474943 49484156454F5054 0003")
        let reply = hex("0003e889045565a9 00000003")
        for round in 0..<5000 {
            var machine = ClientNegotiationStateMachine()
            var buffer = ByteBuffer(bytes: garbage(&generator, prefix: greeting))
            var action = machine.receive(&buffer)
            if case .sendClientFlags = action, machine.canSendOption {
                try? machine.optionSent(.list)
                buffer.writeBytes(garbage(&generator, prefix: reply))
                action = machine.receive(&buffer)
            }
            switch action {
            case .wait, .sendClientFlags, .optionCompleted, .exportNameAccepted: continue
            case .fatal(let error):
                // A violation or an incompatible server, and the connection is done for.
                #expect(
                    [.protocolViolation, .incompatibleServer].contains(error.code) && !error.connectionUsable,
                    "seed \(seed), round \(round): \(error)"
                )
                #expect(!machine.canSendOption, "seed \(seed), round \(round): options after a fatal error")
                var more = ByteBuffer(bytes: reply)
                #expect(machine.receive(&more) == .wait, "seed \(seed), round \(round): input taken after a fatal error")
            }
        }
    }

    @Test func transmissionSurvivesGarbage() {
        let seed = testSeed()
        var generator = SeededGenerator(seed: seed)
        let prefixes = [
            hex("668e33ef 0001 0001 0000000000000001"), hex("67446698 00000000 0000000000000001"),
            hex("668e33ef 0000 0005 0000000000000002"),
        ]
        for round in 0..<5000 {
            var machine = ClientTransmissionStateMachine<Int>(
                configuration: .init(format: round % 2 == 0 ? .structured : .simple, metaContextIDs: [1])
            )
            _ = machine.startRequest(.read, offset: 0, length: 64, context: 1)
            _ = machine.startRequest(.blockStatus, offset: 0, length: 64, context: 2)
            var finished: [Int: Int] = [:]
            var failed = false
            for _ in 0..<4 {
                machine.feed(ByteBuffer(bytes: garbage(&generator, prefix: prefixes[round % 3])))
                while let action = machine.next() {
                    switch action {
                    case .data(let context, let offset, let bytes):
                        // Only what was asked for: the read's 64 bytes, never more.
                        #expect(context == 1 && offset + UInt64(bytes.readableBytes) <= 64, "seed \(seed), round \(round)")
                    case .hole(let context, let offset, let length):
                        #expect(context == 1 && offset + UInt64(length) <= 64, "seed \(seed), round \(round)")
                    case .blockStatus(let context, _, _):
                        #expect(context == 2, "seed \(seed), round \(round)")
                    case .complete(let context, _):
                        finished[context, default: 0] += 1
                    case .fatal(let error, let contexts):
                        #expect(error.code == .protocolViolation && !error.connectionUsable, "seed \(seed), round \(round): \(error)")
                        for context in contexts { finished[context, default: 0] += 1 }
                        failed = true
                    }
                }
            }
            // Each request answered once at most; after a fatal error, each exactly once and
            // nothing more comes out.
            #expect(finished.values.allSatisfy { $0 == 1 }, "seed \(seed), round \(round): \(finished)")
            if failed {
                #expect(finished.keys.sorted() == [1, 2] && machine.hasFailed, "seed \(seed), round \(round): \(finished)")
                machine.feed(ByteBuffer(bytes: prefixes[0]))
                if let extra = machine.next() { Issue.record("seed \(seed), round \(round): \(extra) after a fatal error") }
            }
        }
    }
}
