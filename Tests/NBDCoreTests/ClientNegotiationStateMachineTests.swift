import NIOCore
import Testing

@_spi(NBDMachines) @testable import NBDCore

@Suite("Negotiation state machine")
struct ClientNegotiationStateMachineTests {
    let greeting = hex("4e42444d41474943 49484156454F5054 0003")

    func reply(_ option: OptionCode, _ body: OptionReply.Body) -> [UInt8] {
        encoded { OptionReply(option: option, body: body).encode(into: &$0) }
    }

    static func fatalCode(_ action: ClientNegotiationStateMachine.Action) -> NBDError.Code? {
        if case .fatal(let error) = action { error.code } else { nil }
    }

    func ready() throws -> ClientNegotiationStateMachine {
        var machine = ClientNegotiationStateMachine()
        var buffer = ByteBuffer(bytes: greeting)
        #expect(machine.receive(&buffer) == .sendClientFlags([.fixedNewstyle, .noZeroes]))
        return machine
    }

    @Test func greetingDrippedByteByByte() throws {
        var machine = ClientNegotiationStateMachine()
        var buffer = ByteBuffer()
        for byte in greeting.dropLast() {
            buffer.writeInteger(byte)
            #expect(machine.receive(&buffer) == .wait)
        }
        buffer.writeInteger(greeting.last!)
        #expect(machine.receive(&buffer) == .sendClientFlags([.fixedNewstyle, .noZeroes]))
        #expect(machine.canSendOption)
    }

    @Test func noZeroesOnlyWhenTheServerOffersIt() throws {
        var machine = ClientNegotiationStateMachine()
        var buffer = ByteBuffer(bytes: hex("4e42444d41474943 49484156454F5054 0001"))
        #expect(machine.receive(&buffer) == .sendClientFlags([.fixedNewstyle]))
    }

    @Test(arguments: [
        ("4e42444d41474943 0000420281861253", "oldstyle"),
        ("4e42444d41474943 49484156454F5054 0000", "non-fixed newstyle"),
    ])
    func oldServersAreRefusedByName(vector: String, name: String) {
        var machine = ClientNegotiationStateMachine()
        var buffer = ByteBuffer(bytes: hex(vector))
        guard case .fatal(let error) = machine.receive(&buffer) else {
            Issue.record("\(name) accepted")
            return
        }
        #expect(error.code == .incompatibleServer && error.message.contains(name))
    }

    @Test func listCollectsEveryServerReplyUntilAck() throws {
        var machine = try ready()
        try machine.optionSent(.list)
        var buffer = ByteBuffer(bytes: reply(.list, .server(name: "a", description: "first")))
        #expect(machine.receive(&buffer) == .wait)
        buffer.writeBytes(reply(.list, .server(name: "b", description: "")) + reply(.list, .ack))
        #expect(
            machine.receive(&buffer)
                == .optionCompleted(
                    .list,
                    [
                        .server(name: "a", description: "first"), .server(name: "b", description: ""), .ack,
                    ]
                )
        )
        #expect(machine.canSendOption)
    }

    @Test func noSecondOptionBeforeTheFinalReply() throws {
        var machine = try ready()
        try machine.optionSent(.list)
        #expect(throws: NBDError.self) { try machine.optionSent(.structuredReply) }
    }

    @Test func replyToAnotherOptionIsAViolation() throws {
        var machine = try ready()
        try machine.optionSent(.structuredReply)
        var buffer = ByteBuffer(bytes: reply(.list, .ack))
        #expect(Self.fatalCode(machine.receive(&buffer)) == .protocolViolation)
    }

    @Test(arguments: [
        (OptionCode.go, OptionReply.Body.server(name: "x", description: "")),
        (.list, .info(.name("x"))),
        (.info, .metaContext(id: 1, name: "base:allocation")),
    ])
    func replyTypesMustFitTheOption(option: OptionCode, body: OptionReply.Body) throws {
        var machine = try ready()
        try machine.optionSent(option == .list ? .list : option == .go ? .go(export: "", requests: []) : .info(export: "", requests: []))
        var buffer = ByteBuffer(bytes: reply(option, body))
        #expect(Self.fatalCode(machine.receive(&buffer)) == .protocolViolation)
    }

    @Test func goAcknowledgedWithoutExportInfoIsAViolation() throws {
        var machine = try ready()
        try machine.optionSent(.go(export: "", requests: []))
        var buffer = ByteBuffer(bytes: reply(.go, .ack))
        #expect(Self.fatalCode(machine.receive(&buffer)) == .protocolViolation)
    }

    @Test func goEntersTransmissionWithTheNegotiatedContexts() throws {
        var machine = try ready()
        try machine.optionSent(.structuredReply)
        var buffer = ByteBuffer(bytes: reply(.structuredReply, .ack))
        #expect(machine.receive(&buffer) == .optionCompleted(.structuredReply, [.ack]))
        try machine.optionSent(.setMetaContext(export: "disk", queries: ["base:allocation"]))
        buffer.writeBytes(reply(.setMetaContext, .metaContext(id: 42, name: "base:allocation")) + reply(.setMetaContext, .ack))
        _ = machine.receive(&buffer)
        try machine.optionSent(.go(export: "disk", requests: [.blockSize]))
        buffer.writeBytes(reply(.go, .info(.export(size: 4096, flags: [.hasFlags]))) + reply(.go, .ack))
        guard case .optionCompleted(.go, let replies) = machine.receive(&buffer) else {
            Issue.record("no completion")
            return
        }
        #expect(replies.count == 2)
        #expect(machine.isInTransmission)
        #expect(machine.transmissionMetaContexts.map(\.description) == ["base:allocation (id 42)"])
    }

    @Test func contextsSelectedForAnotherExportDoNotCount() throws {
        var machine = try ready()
        try machine.optionSent(.structuredReply)
        var buffer = ByteBuffer(bytes: reply(.structuredReply, .ack))
        _ = machine.receive(&buffer)
        try machine.optionSent(.setMetaContext(export: "other", queries: ["base:allocation"]))
        buffer.writeBytes(reply(.setMetaContext, .metaContext(id: 1, name: "base:allocation")) + reply(.setMetaContext, .ack))
        _ = machine.receive(&buffer)
        try machine.optionSent(.go(export: "disk", requests: []))
        buffer.writeBytes(reply(.go, .info(.export(size: 4096, flags: [.hasFlags]))) + reply(.go, .ack))
        _ = machine.receive(&buffer)
        #expect(machine.transmissionMetaContexts.isEmpty)
    }

    @Test func errorReplyLeavesNegotiationOpen() throws {
        var machine = try ready()
        try machine.optionSent(.info(export: "nope", requests: []))
        var buffer = ByteBuffer(bytes: reply(.info, .error(.errUnknown, message: "no such export")))
        #expect(machine.receive(&buffer) == .optionCompleted(.info, [.error(.errUnknown, message: "no such export")]))
        #expect(machine.canSendOption)
    }

    @Test func repliesToOneOptionAreBoundedInTotal() throws {
        var limits = ClientNegotiationStateMachine.Limits()
        limits.maximumRepliesLength = 100
        var machine = ClientNegotiationStateMachine(limits: limits)
        var buffer = ByteBuffer(bytes: greeting)
        _ = machine.receive(&buffer)
        try machine.optionSent(.list)
        for _ in 0..<5 { buffer.writeBytes(reply(.list, .server(name: String(repeating: "x", count: 20), description: ""))) }
        #expect(Self.fatalCode(machine.receive(&buffer)) == .protocolViolation)
    }

    @Test func exportNameReplyEntersTransmission() throws {
        var machine = try ready()
        try machine.optionSent(.exportName("disk"))
        var buffer = ByteBuffer(bytes: hex("0000000000001000 0001"))
        #expect(machine.receive(&buffer) == .exportNameAccepted(ExportNameReply(size: 4096, flags: [.hasFlags])))
        #expect(machine.isInTransmission)
    }

    @Test func bytesWhenNothingIsPendingAreAViolation() throws {
        var machine = try ready()
        var buffer = ByteBuffer(bytes: reply(.list, .ack))
        #expect(Self.fatalCode(machine.receive(&buffer)) != nil)
    }
}
