import NIOCore
import Testing

@_spi(NBDMachines) @testable import NBDCore

/// Every number a peer sends is checked before it is added, converted or trusted as a count:
/// each site below gets the number that would wrap, overflow or overrun, and gives a typed
/// error instead of a trap.
@Suite("A peer's numbers")
struct PeerNumbersTests {
    /// Feeds a structured reply to a machine holding a READ (cookie 1, 64 bytes at 0) and a
    /// BLOCK_STATUS (cookie 2); returns the fatal error, if any.
    func clientFatal(_ chunk: String) -> NBDError? {
        var machine = ClientTransmissionStateMachine<Int>(configuration: .init(format: .structured, metaContextIDs: [1]))
        _ = machine.startRequest(.read, offset: 0, length: 64, context: 1)
        _ = machine.startRequest(.blockStatus, offset: 0, length: 4096, context: 2)
        machine.feed(ByteBuffer(bytes: hex(chunk)))
        while let action = machine.next() {
            if case .fatal(let error, _) = action { return error }
        }
        return nil
    }

    @Test(arguments: [
        // OFFSET_DATA at 2^64 - 16 with 32 bytes: offset + length wraps.
        ("668e33ef 0000 0001 0000000000000001 00000028 fffffffffffffff0" + String(repeating: "11", count: 32), "outside"),
        // OFFSET_HOLE of 16 bytes at 2^64 - 1.
        ("668e33ef 0000 0002 0000000000000001 0000000c ffffffffffffffff 00000010", "outside"),
        // BLOCK_STATUS whose payload is not a whole number of descriptors.
        ("668e33ef 0001 0005 0000000000000002 0000000b 00000001 00000200 000000", "NBD_REPLY_TYPE_BLOCK_STATUS with length 11"),
        // An error chunk whose message is longer than its payload.
        ("668e33ef 0001 8001 0000000000000001 00000009 00000005 03e8 414243", "message"),
        // A chunk announcing 4 GiB of payload.
        ("668e33ef 0001 0005 0000000000000002 ffffffff 00000001", "exceeds"),
    ])
    func theClientRefusesNumbersThatDoNotAddUp(chunk: String, mentions: String) {
        let error = clientFatal(chunk)
        #expect(error?.code == .protocolViolation, "\(String(describing: error))")
        #expect(error?.message.contains(mentions) == true, "\(String(describing: error))")
    }

    @Test func theServerAnswersARangeThatWrapsWithEINVAL() {
        let export = ServerNegotiationStateMachine.Export(
            name: "",
            size: 1 << 20,
            flags: [.hasFlags, .sendTrim, .sendWriteZeroes],
            blockSizes: BlockSizeConstraints(minimum: 1, preferred: 4096, maximum: 65536)
        )
        let agreement = ServerNegotiationStateMachine.Agreement(
            export: export,
            flags: export.flags,
            format: .simple,
            metaContexts: []
        )
        var machine = ServerTransmissionStateMachine(agreement: agreement, limits: .init(maximumPayload: 65536, maximumRequestsInFlight: 4))
        for (cookie, type) in [(1, CommandType.read), (2, .trim), (3, .writeZeroes)] {
            var bytes = ByteBuffer()
            RequestHeader(type: type, cookie: NBDCookie(UInt64(cookie)), offset: .max - 100, length: 512).encode(into: &bytes)
            machine.bytesReceived(bytes)
            guard case .write(let buffers)? = machine.next(), var reply = buffers.first,
                case .simple(let header)? = try? ReplyHeader.decode(from: &reply)
            else {
                Issue.record("\(type) of a range that wraps was not answered")
                continue
            }
            #expect(header.error == (type == .writeZeroes ? .ENOSPC : .EINVAL))
        }
    }

    @Test(arguments: [
        // INFO whose name claims 4 GiB inside 8 bytes of option data.
        "49484156454F5054 00000006 00000008 ffffffff 00000000",
        // SET_META_CONTEXT claiming 2^32 - 1 queries in 8 bytes.
        "49484156454F5054 0000000a 00000008 00000000 ffffffff",
        // LIST_META_CONTEXT with one query longer than the data.
        "49484156454F5054 00000009 0000000c 00000000 00000001 00000100",
    ])
    func theServerRefusesOptionsWhoseInnerLengthsOverrunTheirData(option: String) {
        var machine = ServerNegotiationStateMachine(exports: [], maximumOptionLength: 4096)
        var flags = ByteBuffer(integer: ClientFlags([.fixedNewstyle, .noZeroes]).rawValue)
        _ = machine.receive(&flags)
        var bytes = ByteBuffer(bytes: hex(option))
        switch machine.receive(&bytes) {
        case .send(var reply):
            // Answered with an error reply (NBD_REP_ERR_INVALID), and negotiation goes on.
            let decoded = try? OptionReply.decode(from: &reply, maximumLength: 4096)
            guard case .error(let type, _)? = decoded?.body else {
                Issue.record("an option that overruns its data was accepted: \(String(describing: decoded))")
                return
            }
            #expect(type == .errInvalid)
        case .fatal(let error):
            #expect(error.code == .protocolViolation)
        default:
            Issue.record("an option that overruns its data was neither refused nor fatal")
        }
    }

    @Test func blockSizesThatAreNotPowersOfTwoAreRefused() {
        let replies: [OptionReply.Body] = [
            .info(.export(size: 1 << 20, flags: [.hasFlags])),
            .info(.blockSize(BlockSizeConstraints(minimum: 3, preferred: 4096, maximum: 65536))),
            .ack,
        ]
        #expect(throws: NBDError.self) { try NBDExportInfo(requestedName: "", replies: replies) }
    }
}
