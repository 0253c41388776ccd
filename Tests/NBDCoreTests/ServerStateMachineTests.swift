import NIOCore
@_spi(NBDMachines) import TestSupport
import Testing

@_spi(NBDMachines) @testable import NBDCore

/// The server's machines on their own: what a client may and may not do.
@Suite("Server state machines")
struct ServerStateMachineTests {
    static let export = ServerNegotiationStateMachine.Export(
        name: "disk",
        size: 1 << 20,
        flags: [.hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes],
        blockSizes: BlockSizeConstraints(minimum: 1, preferred: 4096, maximum: 65536)
    )

    func negotiation() -> ServerNegotiationStateMachine {
        var machine = ServerNegotiationStateMachine(exports: [Self.export], maximumOptionLength: 1024)
        var flags = ByteBuffer(integer: ClientFlags([.fixedNewstyle, .noZeroes]).rawValue)
        if case .wait = machine.receive(&flags) {} else { Issue.record("the client flags were not taken") }
        return machine
    }

    func option(_ request: OptionRequest) -> ByteBuffer {
        var buffer = ByteBuffer()
        request.encode(into: &buffer)
        return buffer
    }

    func replies(_ action: ServerNegotiationStateMachine.Action) -> [OptionReply] {
        guard case .send(var bytes) = action else { return [] }
        var replies: [OptionReply] = []
        while let reply = try? OptionReply.decode(from: &bytes, maximumLength: 1 << 16) { replies.append(reply) }
        return replies
    }

    @Test func theGreetingIsFixedNewstyleWithNoZeroes() throws {
        var greeting = ServerNegotiationStateMachine(exports: []).greeting()
        #expect(try ServerGreeting.decode(from: &greeting) == .newstyle([.fixedNewstyle, .noZeroes]))
    }

    @Test func unknownClientFlagsEndTheSession() {
        var machine = ServerNegotiationStateMachine(exports: [Self.export])
        var flags = ByteBuffer(integer: UInt32(0x8000_0001))
        guard case .fatal(let error) = machine.receive(&flags) else {
            Issue.record("accepted unknown client flags")
            return
        }
        #expect(error.message.contains("by the client"))
    }

    @Test func anOversizedOptionEndsTheSessionBeforeItsDataArrives() {
        var machine = negotiation()
        var bytes = ByteBuffer()
        bytes.writeMultipleIntegers(NBDMagic.haveOption, OptionCode.list.rawValue, UInt32(1 << 30))
        guard case .fatal(let error) = machine.receive(&bytes) else {
            Issue.record("waited for 1 GiB of option data")
            return
        }
        #expect(error.code == .protocolViolation)
    }

    @Test func listInfoAndUnknownOptions() {
        var machine = negotiation()
        var list = option(.list)
        #expect(replies(machine.receive(&list)).map(\.body) == [.server(name: "disk", description: ""), .ack])
        var info = option(.info(export: "nope", requests: []))
        #expect(replies(machine.receive(&info)).map(\.body) == [.error(.errUnknown, message: "no export named \"nope\"")])
        var tls = option(.startTLS)
        #expect(replies(machine.receive(&tls)).first?.body.isError == true)
        var context = option(.setMetaContext(export: "disk", queries: ["base:allocation"]))
        // "This option MUST NOT be requested unless structured replies have been negotiated first."
        #expect(replies(machine.receive(&context)).first?.body.isError == true)
    }

    @Test func abortIsAcknowledgedThenTheSessionCloses() {
        var machine = negotiation()
        var abort = option(.abort)
        guard case .close(var bytes) = machine.receive(&abort) else {
            Issue.record("ABORT did not close")
            return
        }
        #expect((try? OptionReply.decode(from: &bytes, maximumLength: 64))??.body == .ack)
    }

    func transmission(inFlight: Int = 4) -> ServerTransmissionStateMachine {
        let agreement = ServerNegotiationStateMachine.Agreement(
            export: Self.export,
            flags: Self.export.flags,
            format: .simple,
            metaContexts: []
        )
        return ServerTransmissionStateMachine(agreement: agreement, limits: .init(maximumPayload: 65536, maximumRequestsInFlight: inFlight))
    }

    func request(
        _ type: CommandType,
        cookie: NBDCookie = 1,
        flags: CommandFlags = [],
        offset: UInt64 = 0,
        length: UInt64 = 512
    ) -> ByteBuffer {
        var buffer = ByteBuffer()
        RequestHeader(flags: flags, type: type, cookie: cookie, offset: offset, length: length).encode(into: &buffer)
        return buffer
    }

    func simpleError(_ action: ServerTransmissionStateMachine.Action?) -> NBDErrno? {
        guard case .write(let buffers)? = action, var first = buffers.first,
            case .simple(let reply)? = try? ReplyHeader.decode(from: &first)
        else { return nil }
        return reply.error
    }

    @Test func checksAreAnsweredWithTheSpecsErrorsAndTheSessionGoesOn() {
        var machine = transmission()
        machine.bytesReceived(request(.read, offset: 1 << 20))
        #expect(simpleError(machine.next()) == .EINVAL)
        machine.bytesReceived(request(.writeZeroes, offset: (1 << 20) - 1, length: 2))
        #expect(simpleError(machine.next()) == .ENOSPC)
        machine.bytesReceived(request(.read, flags: .noHole))
        #expect(simpleError(machine.next()) == .EINVAL)
        machine.bytesReceived(request(.read, length: 65537))
        #expect(simpleError(machine.next()) == .EOVERFLOW)
        machine.bytesReceived(request(.blockStatus))
        #expect(simpleError(machine.next()) == .EINVAL)
        machine.bytesReceived(request(CommandType(rawValue: 99)))
        #expect(simpleError(machine.next()) == .EINVAL)
        machine.bytesReceived(request(.read, flags: .fua))
        guard case .perform(let header, _)? = machine.next() else {
            Issue.record("a valid READ was not performed")
            return
        }
        #expect(header.type == .read)
    }

    @Test func aWriteIsPerformedOnlyOnceItsDataIsWhole() {
        var machine = transmission()
        var bytes = request(.write, length: 1000)
        bytes.writeBytes([UInt8](repeating: 7, count: 999))
        machine.bytesReceived(bytes)
        #expect(isNothing(machine.next()))
        machine.bytesReceived(ByteBuffer(bytes: [7]))
        guard case .perform(_, let operation)? = machine.next() else {
            Issue.record("the WRITE was not performed")
            return
        }
        let data = operation.payload
        #expect(data.reduce(0) { $0 + $1.readableBytes } == 1000)
        #expect(data.allSatisfy { $0.readableBytesView.allSatisfy { $0 == 7 } })
    }

    @Test(arguments: ["oversized write", "request after DISC", "too many in flight", "bad magic"])
    func violationsEndTheSession(kind: String) {
        var machine = transmission(inFlight: 2)
        switch kind {
        case "oversized write": machine.bytesReceived(request(.write, length: 65537))
        case "request after DISC":
            machine.bytesReceived(request(.read))
            _ = machine.next()
            machine.bytesReceived(request(.disconnect, cookie: 2))
            machine.bytesReceived(request(.read, cookie: 3))
        case "too many in flight":
            for cookie in 1...3 { machine.bytesReceived(request(.read, cookie: NBDCookie(UInt64(cookie)))) }
            _ = machine.next()
            _ = machine.next()
        default: machine.bytesReceived(ByteBuffer(bytes: [UInt8](repeating: 0x42, count: 28)))
        }
        guard case .fatal(let error)? = machine.next() else {
            Issue.record("\(kind) was accepted")
            return
        }
        #expect(error.message.contains("protocol violation by the client"))
        machine.bytesReceived(request(.read, cookie: 9))
        #expect(isNothing(machine.next()))
    }

    @Test func disconnectClosesOnceEveryRequestIsAnswered() {
        var machine = transmission()
        machine.bytesReceived(request(.read))
        guard case .perform(let header, _)? = machine.next() else {
            Issue.record("not performed")
            return
        }
        machine.bytesReceived(request(.disconnect, cookie: 2))
        #expect(isNothing(machine.next()))
        machine.requestCompleted(header, .data([.data(ByteBuffer(repeating: 1, count: 512))]))
        guard case .write? = machine.next() else {
            Issue.record("the READ was not answered")
            return
        }
        guard case .close? = machine.next() else {
            Issue.record("no close after the last reply")
            return
        }
    }
}

extension OptionReply.Body {
    var isError: Bool { if case .error = self { true } else { false } }
}

/// Whether a machine had nothing to do.
func isNothing(_ action: ServerTransmissionStateMachine.Action?) -> Bool { action == nil }
