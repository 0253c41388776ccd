import NIOCore
import Testing

@_spi(NBDMachines) @testable import NBDCore

/// Extended headers (`NBD_OPT_EXTENDED_HEADERS`): the spec's layouts byte by byte, and what
/// each machine accepts and refuses once they are agreed.
@Suite("Extended headers")
struct ExtendedHeadersTests {
    typealias Machine = ClientTransmissionStateMachine<String>

    // MARK: Byte vectors ("Request message", "Extended reply chunk message", BLOCK_STATUS_EXT)

    @Test func extendedRequestHeader() throws {
        // A 1 TiB trim: a 64-bit effect length.
        let header = RequestHeader(type: .trim, cookie: 0x0102_0304_0506_0708, offset: 4096, length: 1 << 40)
        let bytes = hex("21e41c71 0000 0004 0102030405060708 0000000000001000 0000010000000000")
        #expect(encoded { header.encode(into: &$0, format: .extended) } == bytes)
        #expect(try decodeBothWays(bytes) { try RequestHeader.decode(from: &$0, format: .extended) } == header)
        #expect(RequestHeader.size(in: .extended) == 32 && RequestHeader.size(in: .structured) == 28)
    }

    @Test func aWriteCarriesPayloadLenAndAFilteredBlockStatusItsPayload() {
        var machine = Machine(configuration: .init(format: .extended, metaContextIDs: [1, 2]))
        let write = machine.startRequest(.write, offset: 0, length: 512, context: "w")
        #expect(write.flags == .payloadLength && write.length == 512)
        #expect(
            encoded { machine.encode(write, into: &$0) }
                == hex("21e41c71 0020 0001 0000000000000001 0000000000000000 0000000000000200")
        )
        // "C: 64 bits, effect length; C: n * 32 bits, list of metacontext ids to use"
        let status = machine.startRequest(.blockStatus, offset: 0, length: 1 << 33, onlyContexts: [2], context: "b")
        #expect(status.flags == .payloadLength && status.length == 12)
        #expect(
            encoded { machine.encode(status, into: &$0) }
                == hex("21e41c71 0020 0007 0000000000000002 0000000000000000 000000000000000c  0000000200000000 00000002")
        )
    }

    @Test func extendedReplyHeader() throws {
        let bytes = hex("6e8a278c 0001 0006 0000000000000002 0000000000001000 0000000000000018")
        let header = try decodeBothWays(bytes) { try ReplyHeader.decode(from: &$0, format: .extended) }
        #expect(header == .extended(ExtendedReplyHeader(flags: .done, type: .blockStatusExtended, cookie: 2, offset: 4096, length: 24)))
        #expect(encoded { header.encode(into: &$0) } == bytes)
    }

    @Test func blockStatusExtendedPayload() throws {
        let chunk = ReplyChunk.blockStatusExtended(contextID: 1, descriptors: [BlockDescriptor(length: 1 << 40, flags: 3)])
        let bytes = hex("00000001 00000001 0000010000000000 0000000000000003")
        #expect(encoded { chunk.encode(into: &$0) } == bytes)
        var payload = ByteBuffer(bytes: bytes)
        #expect(try ReplyChunk.decode(type: .blockStatusExtended, payload: &payload) == chunk)
    }

    @Test(arguments: [
        // The count says 2, the chunk holds 1.
        ("00000001 00000002 0000000000001000 0000000000000000", "counts 2 descriptors"),
        // No descriptor at all.
        ("00000001 00000000", "MUST be 8 + a positive multiple of 16"),
        // Not a multiple of 16 after the header.
        ("00000001 00000001 0000000000001000 00000000", "MUST be 8 + a positive multiple of 16"),
        // An extent of length 0.
        ("00000001 00000001 0000000000000000 0000000000000000", "length 0"),
    ])
    func badBlockStatusExtendedChunks(payload: String, message: String) {
        var buffer = ByteBuffer(bytes: hex(payload))
        #expect {
            _ = try ReplyChunk.decode(type: .blockStatusExtended, payload: &buffer)
        } throws: { "\($0)".contains(message) }
    }

    @Test func eachFormatRefusesTheOtherHeaders() {
        let compact = hex("668e33ef 0001 0000 0000000000000001 00000000")
        let simple = hex("67446698 00000000 0000000000000001")
        let extended = hex("6e8a278c 0001 0000 0000000000000001 0000000000000000 0000000000000000")
        for (bytes, format, message) in [
            (compact, TransmissionFormat.extended, "structured reply chunk although extended headers were negotiated"),
            (simple, .extended, "simple reply although extended headers were negotiated"),
            (extended, .structured, "extended reply chunk although extended headers were not negotiated"),
            (compact, .simple, "structured reply chunk although structured replies were not negotiated"),
        ] {
            var buffer = ByteBuffer(bytes: bytes)
            #expect {
                _ = try ReplyHeader.decode(from: &buffer, format: format)
            } throws: { "\($0)".contains(message) }
        }
        var request = ByteBuffer(bytes: hex("25609513 0000 0000 0000000000000001 0000000000000000 00000200"))
        #expect {
            _ = try RequestHeader.decode(from: &request, format: .extended)
        } throws: { "\($0)".contains("compact request header although extended headers were negotiated") }
    }

    // MARK: The client's checks

    func extendedChunk(_ cookie: NBDCookie, _ type: ReplyChunkType, offset: UInt64, done: Bool = true, _ payload: [UInt8]) -> [UInt8] {
        encoded {
            ReplyHeader.extended(
                ExtendedReplyHeader(flags: done ? .done : [], type: type, cookie: cookie, offset: offset, length: UInt64(payload.count))
            ).encode(into: &$0)
            $0.writeBytes(payload)
        }
    }

    func run(_ machine: inout Machine, _ bytes: [UInt8]) -> [String] {
        machine.feed(ByteBuffer(bytes: bytes))
        var events: [String] = []
        while let action = machine.next() {
            switch action {
            case .data(let c, let offset, let bytes): events.append("\(c) data \(offset) \(bytes.readableBytes)")
            case .hole(let c, let offset, let length): events.append("\(c) hole \(offset) \(length)")
            case .blockStatus(let c, let id, let d): events.append("\(c) status \(id) \(d.map(\.length))")
            case .complete(let c, let error): events.append("\(c) done \(error.map { "\($0)" } ?? "ok")")
            case .fatal(let error, _): events.append("fatal \(error)")
            }
        }
        return events
    }

    @Test func aReadAndAWriteAnsweredInExtendedChunks() {
        var machine = Machine(configuration: .init(format: .extended))
        let read = machine.startRequest(.read, offset: 8192, length: 1024, context: "r")
        let write = machine.startRequest(.write, offset: 0, length: 16, context: "w")
        var bytes = extendedChunk(
            read.cookie,
            .offsetData,
            offset: 8192,
            done: false,
            hex("0000000000002000") + [UInt8](repeating: 7, count: 512)
        )
        bytes += extendedChunk(read.cookie, .offsetHole, offset: 8192, hex("0000000000002200 00000200"))
        bytes += extendedChunk(write.cookie, .none, offset: 0, [])
        #expect(run(&machine, bytes) == ["r data 8192 512", "r hole 8704 512", "r done ok", "w done ok"])
    }

    @Test func aChunkForAnotherOffsetIsAViolation() {
        var machine = Machine(configuration: .init(format: .extended))
        let write = machine.startRequest(.write, offset: 4096, length: 16, context: "w")
        let events = run(&machine, extendedChunk(write.cookie, .none, offset: 0, []))
        #expect(events.count == 1 && events[0].contains("extended reply chunk at offset 0 for NBD_CMD_WRITE at offset 4096"))
    }

    @Test func dataBeyondTheRequestIsAViolation() {
        var machine = Machine(configuration: .init(format: .extended))
        let read = machine.startRequest(.read, offset: 0, length: 512, context: "r")
        // A 64-bit chunk length past the 512 bytes asked for.
        let header = encoded {
            ReplyHeader.extended(ExtendedReplyHeader(flags: .done, type: .offsetData, cookie: read.cookie, offset: 0, length: 1 << 40))
                .encode(into: &$0)
            $0.writeInteger(UInt64(0))
        }
        let events = run(&machine, header)
        #expect(
            events.count == 1 && events[0].hasSuffix("NBD_REPLY_TYPE_OFFSET_DATA for bytes 0..<1099511627768, outside the request 0..<512")
        )
    }

    @Test func oversizedBufferedChunksAreRefusedBeforeTheyArrive() {
        var machine = Machine(configuration: .init(format: .extended, metaContextIDs: [1]))
        let status = machine.startRequest(.blockStatus, offset: 0, length: 1 << 40, context: "b")
        let header = encoded {
            ReplyHeader.extended(
                ExtendedReplyHeader(flags: .done, type: .blockStatusExtended, cookie: status.cookie, offset: 0, length: UInt64.max)
            ).encode(into: &$0)
        }
        let events = run(&machine, header)
        #expect(events.count == 1 && events[0].contains("exceeds the bound"))
    }

    func statusMachine(_ only: [UInt32]? = nil, length: UInt64 = 1 << 40) -> (Machine, NBDCookie) {
        var machine = Machine(configuration: .init(format: .extended, metaContextIDs: [1, 2], narrowStatusContextIDs: [1]))
        let header = machine.startRequest(.blockStatus, offset: 0, length: length, onlyContexts: only, context: "b")
        return (machine, header.cookie)
    }

    func extents(_ id: UInt32, _ descriptors: [(UInt64, UInt64)]) -> [UInt8] {
        encoded {
            ReplyChunk.blockStatusExtended(contextID: id, descriptors: descriptors.map { BlockDescriptor(length: $0.0, flags: $0.1) })
                .encode(into: &$0)
        }
    }

    @Test func a64BitExtentAnswersATerabyteInOneRequest() {
        var (machine, cookie) = statusMachine()
        var bytes = extendedChunk(cookie, .blockStatusExtended, offset: 0, done: false, extents(1, [(1 << 40, 3)]))
        bytes += extendedChunk(cookie, .blockStatusExtended, offset: 0, extents(2, [(1 << 39, 0), (1 << 39, 1)]))
        #expect(run(&machine, bytes) == ["b status 1 [1099511627776]", "b status 2 [549755813888, 549755813888]", "b done ok"])
    }

    @Test(arguments: [
        // A 32-bit chunk once extended headers are on.
        ("compact", "NBD_REPLY_TYPE_BLOCK_STATUS although extended headers were negotiated"),
        // Extents past the request before the last one.
        ("past", "block status extents run past the requested length"),
        // A last extent that would run past the largest offset.
        ("wrap", "run past the largest offset"),
        // Status bits above 32 for base:allocation.
        ("wide", "sets status bits above 32"),
    ])
    func blockStatusViolations(kind: String, message: String) {
        var (machine, cookie) = statusMachine(length: 1 << 20)
        let payload: [UInt8]
        var type = ReplyChunkType.blockStatusExtended
        switch kind {
        case "compact":
            type = .blockStatus
            payload = encoded {
                ReplyChunk.blockStatus(contextID: 1, descriptors: [BlockDescriptor(length: 512, flags: 0)]).encode(into: &$0)
            }
        case "past": payload = extents(2, [(1 << 20, 0), (512, 0)])
        case "wrap": payload = extents(2, [(512, 0), (UInt64.max - 100, 0)])
        default: payload = extents(1, [(512, 1 << 32)])
        }
        let events = run(&machine, extendedChunk(cookie, type, offset: 0, payload))
        #expect(events.count == 1 && events[0].contains(message), "\(events)")
    }

    @Test func aFilteredBlockStatusMayAnswerOnlyForItsContexts() {
        var (machine, cookie) = statusMachine([2])
        #expect(
            run(&machine, extendedChunk(cookie, .blockStatusExtended, offset: 0, extents(2, [(4096, 0)]))) == [
                "b status 2 [4096]", "b done ok",
            ]
        )
        var (other, second) = statusMachine([2])
        let events = run(&other, extendedChunk(second, .blockStatusExtended, offset: 0, extents(1, [(4096, 0)])))
        #expect(events.count == 1 && events[0].contains("which the request filtered out"))
    }

    // MARK: Negotiation

    @Test func goRefusedAsUnsupportedAfterExtendedHeadersIsAViolation() {
        var machine = ClientNegotiationStateMachine()
        var greeting = ByteBuffer()
        ServerGreeting.newstyle([.fixedNewstyle, .noZeroes]).encode(into: &greeting)
        _ = machine.receive(&greeting)
        try? machine.optionSent(.extendedHeaders)
        var ack = ByteBuffer()
        OptionReply(option: .extendedHeaders, body: .ack).encode(into: &ack)
        _ = machine.receive(&ack)
        #expect(machine.negotiated.format == .extended)
        // "a client MUST NOT use NBD_OPT_EXPORT_NAME" once extended headers are agreed.
        #expect(throws: NBDError.self) { try machine.optionSent(.exportName("disk")) }
        try? machine.optionSent(.go(export: "disk", requests: []))
        var refusal = ByteBuffer()
        OptionReply(option: .go, body: .error(.errUnsupported, message: "")).encode(into: &refusal)
        guard case .fatal(let error) = machine.receive(&refusal) else {
            Issue.record("GO refused as unsupported was taken")
            return
        }
        #expect("\(error)".contains("NBD_OPT_GO refused as unsupported after extended headers were acknowledged"))
    }

    // MARK: The server's checks

    static let export = ServerNegotiationStateMachine.Export(
        name: "disk",
        size: 1 << 41,
        flags: [.hasFlags, .sendFlush, .sendTrim, .sendWriteZeroes],
        blockSizes: BlockSizeConstraints(minimum: 1, preferred: 4096, maximum: 65536)
    )

    func server() -> ServerTransmissionStateMachine {
        let agreement = ServerNegotiationStateMachine.Agreement(
            export: Self.export,
            flags: Self.export.flags.union(.blockStatusPayload),
            format: .extended,
            metaContexts: [NBDMetaContext(id: 1, name: "base:allocation")]
        )
        return ServerTransmissionStateMachine(agreement: agreement, limits: .init(maximumPayload: 65536, maximumRequestsInFlight: 8))
    }

    func send(_ machine: inout ServerTransmissionStateMachine, _ header: RequestHeader, payload: [UInt8] = []) {
        var buffer = ByteBuffer()
        header.encode(into: &buffer, format: .extended)
        buffer.writeBytes(payload)
        machine.bytesReceived(buffer)
    }

    /// The reply chunk headers the server wrote.
    func writtenHeaders(_ action: ServerTransmissionStateMachine.Action?) -> [ReplyHeader] {
        guard case .write(let buffers) = action else { return [] }
        var all = buffers.gathered(capacity: 1 << 16)
        var headers: [ReplyHeader] = []
        while let header = try? ReplyHeader.decode(from: &all, format: .extended) {
            headers.append(header)
            if case .extended(let chunk) = header { all.moveReaderIndex(forwardBy: Int(chunk.length)) }
        }
        return headers
    }

    @Test func aTerabyteTrimIsOneRequestAndItsReplyAnExtendedChunk() throws {
        var machine = server()
        send(&machine, RequestHeader(type: .trim, cookie: 5, offset: 1 << 40, length: 1 << 40))
        guard case .perform(let request, _)? = machine.next() else {
            Issue.record("the trim was not performed")
            return
        }
        #expect(request.length == 1 << 40)
        machine.requestCompleted(request, .done)
        // "the server MUST NOT use simple replies even when there is no payload"
        #expect(
            writtenHeaders(machine.next()) == [
                .extended(ExtendedReplyHeader(flags: .done, type: .none, cookie: 5, offset: 1 << 40, length: 0))
            ]
        )
    }

    @Test func aPayloadWhereNoneBelongsIsConsumedAndRefused() {
        var machine = server()
        send(&machine, RequestHeader(flags: .payloadLength, type: .trim, cookie: 1, offset: 0, length: 4), payload: [1, 2, 3, 4])
        send(&machine, RequestHeader(type: .flush, cookie: 2, offset: 0, length: 0))
        let refusal = writtenHeaders(machine.next())
        guard case .extended(let chunk)? = refusal.first else {
            Issue.record("no refusal: \(refusal)")
            return
        }
        #expect(chunk.type == .error && chunk.cookie == 1)
        // The payload was consumed: the next request is read as one.
        guard case .perform(let flush, _)? = machine.next() else {
            Issue.record("the flush after the payload was not performed")
            return
        }
        #expect(flush.type == .flush && flush.cookie == 2)
    }

    @Test func theBlockStatusFilterIsCheckedAndItsEffectLengthUsed() {
        var machine = server()
        var filter = ByteBuffer()
        filter.writeMultipleIntegers(UInt64(1 << 40), UInt32(1))
        send(
            &machine,
            RequestHeader(flags: .payloadLength, type: .blockStatus, cookie: 1, offset: 0, length: 12),
            payload: Array(filter.readableBytesView)
        )
        guard case .perform(let request, .blockStatus(_, let length))? = machine.next() else {
            Issue.record("the filtered block status was not performed")
            return
        }
        #expect(request.length == 1 << 40 && length == 1 << 40 && !request.flags.contains(.payloadLength))
        // An id that was never negotiated: EINVAL, after the payload.
        var unknown = ByteBuffer()
        unknown.writeMultipleIntegers(UInt64(512), UInt32(9))
        send(
            &machine,
            RequestHeader(flags: .payloadLength, type: .blockStatus, cookie: 2, offset: 0, length: 12),
            payload: Array(unknown.readableBytesView)
        )
        guard case .extended(let chunk)? = writtenHeaders(machine.next()).first else {
            Issue.record("an unknown context id was not refused")
            return
        }
        #expect(chunk.type == .error && chunk.cookie == 2)
    }

    @Test func aWriteWithoutPayloadLenStillCarriesItsData() {
        // qemu 10 sends its extended writes so.
        var machine = server()
        send(&machine, RequestHeader(type: .write, cookie: 1, offset: 0, length: 4), payload: [1, 2, 3, 4])
        send(&machine, RequestHeader(type: .flush, cookie: 2, offset: 0, length: 0))
        guard case .perform(let write, .write(let data, _, _))? = machine.next(), case .perform(let flush, _)? = machine.next() else {
            Issue.record("the write and the flush after it were not both performed")
            return
        }
        #expect(write.type == .write && data.map { Array($0.readableBytesView) } == [[1, 2, 3, 4]] && flush.type == .flush)
    }

    @Test(arguments: ["compact header", "payload too long"])
    func framingViolationsEndTheSession(kind: String) {
        var machine = server()
        var buffer = ByteBuffer()
        switch kind {
        case "compact header":
            RequestHeader(type: .flush, cookie: 1, offset: 0, length: 0).encode(into: &buffer)
        default:
            RequestHeader(flags: .payloadLength, type: .write, cookie: 1, offset: 0, length: 1 << 32).encode(
                into: &buffer,
                format: .extended
            )
        }
        machine.bytesReceived(buffer)
        guard case .fatal? = machine.next() else {
            Issue.record("\(kind) was not a violation")
            return
        }
    }

    @Test func serverNegotiationOffersExtendedHeadersAndRefusesExportNameAfter() throws {
        var machine = ServerNegotiationStateMachine(exports: [Self.export])
        var bytes = ByteBuffer(integer: ClientFlags([.fixedNewstyle, .noZeroes]).rawValue)
        OptionRequest.extendedHeaders.encode(into: &bytes)
        guard case .send(var reply) = machine.receive(&bytes) else {
            Issue.record("no answer to NBD_OPT_EXTENDED_HEADERS")
            return
        }
        #expect(try OptionReply.decode(from: &reply, maximumLength: 1 << 16)?.body == .ack)
        var exportName = ByteBuffer()
        OptionRequest.exportName("disk").encode(into: &exportName)
        guard case .fatal = machine.receive(&exportName) else {
            Issue.record("NBD_OPT_EXPORT_NAME after extended headers was taken")
            return
        }
    }
}
