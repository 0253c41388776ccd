import NIOCore
import Testing

@_spi(NBDMachines) @testable import NBDCore

/// Random bytes from a hostile server never crash the parsers: each ends in a wait or an error.
@Suite("Garbage in")
struct GarbageTests {
    struct Generator: RandomNumberGenerator {
        var state: UInt64
        mutating func next() -> UInt64 {
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            return state
        }
    }

    /// Mostly valid prefixes with random tails, so the parsers get past their magics.
    func garbage(_ generator: inout Generator, prefix: [UInt8]) -> [UInt8] {
        let count = Int.random(in: 0...64, using: &generator)
        return prefix.prefix(Int.random(in: 0...prefix.count, using: &generator))
            + (0..<count).map { _ in UInt8.random(in: 0...255, using: &generator) }
    }

    @Test func negotiationSurvivesGarbage() {
        var generator = Generator(state: 1)
        let greeting = hex("4e42444d41474943 49484156454F5054 0003")
        let reply = hex("0003e889045565a9 00000003")
        for _ in 0..<5000 {
            var machine = ClientNegotiationStateMachine()
            var buffer = ByteBuffer(bytes: garbage(&generator, prefix: greeting))
            guard ClientNegotiationStateMachineTests.fatalCode(machine.receive(&buffer)) == nil, machine.canSendOption else { continue }
            try? machine.optionSent(.list)
            buffer.writeBytes(garbage(&generator, prefix: reply))
            _ = machine.receive(&buffer)
        }
    }

    @Test func transmissionSurvivesGarbage() {
        var generator = Generator(state: 2)
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
            for _ in 0..<4 {
                machine.feed(ByteBuffer(bytes: garbage(&generator, prefix: prefixes[round % 3])))
                while let action = machine.next() {
                    if case .fatal = action { break }
                }
            }
        }
    }
}
