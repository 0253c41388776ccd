import NIOCore
import Testing

@_spi(NBDMachines) @testable import NBDCore

@Suite("Wire: byte vectors from the spec")
struct WireTests {
    @Test func newstyleGreeting() throws {
        // NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE | NO_ZEROES
        let bytes = hex("4e42444d41474943" + "49484156454F5054" + "0003")
        let greeting = try decodeBothWays(bytes) { try ServerGreeting.decode(from: &$0) }
        #expect(greeting == .newstyle([.fixedNewstyle, .noZeroes]))
        #expect(encoded { greeting.encode(into: &$0) } == bytes)
    }

    @Test func oldstyleGreetingIsRecognised() throws {
        let bytes = hex("4e42444d41474943" + "0000420281861253")
        #expect(try decodeBothWays(bytes) { try ServerGreeting.decode(from: &$0) } == .oldstyle)
    }

    @Test func notNBDIsRefused() {
        var buffer = ByteBuffer(bytes: Array("HTTP/1.1 200 OK\r\n".utf8))
        #expect(throws: NBDError.self) { try ServerGreeting.decode(from: &buffer) }
    }

    @Test(arguments: [
        (OptionRequest.exportName("disk"), "49484156454F5054 00000001 00000004 6469736b"),
        (.abort, "49484156454F5054 00000002 00000000"),
        (.list, "49484156454F5054 00000003 00000000"),
        (.startTLS, "49484156454F5054 00000005 00000000"),
        (.info(export: "a", requests: [.name, .blockSize]), "49484156454F5054 00000006 0000000b 00000001 61 0002 0001 0003"),
        (.go(export: "", requests: []), "49484156454F5054 00000007 00000006 00000000 0000"),
        (.structuredReply, "49484156454F5054 00000008 00000000"),
        (.listMetaContext(export: "e", queries: ["base:"]), "49484156454F5054 00000009 00000012 00000001 65 00000001 00000005 626173653a"),
        (
            .setMetaContext(export: "", queries: ["base:allocation", "qemu:dirty-bitmap:b"]),
            "49484156454F5054 0000000a 00000032 00000000 00000002 0000000f 626173653a616c6c6f636174696f6e "
                + "00000013 71656d753a64697274792d6269746d61703a62"
        ),
    ])
    func optionRequests(request: OptionRequest, vector: String) throws {
        let bytes = hex(vector)
        #expect(encoded { request.encode(into: &$0) } == bytes)
        #expect(try decodeBothWays(bytes) { try OptionRequest.decode(from: &$0) } == request)
    }

    /// "MUST be no longer than 4096 bytes": a longer export name or query in a client's option
    /// is the client's violation, and the error the server logs says so.
    @Test(arguments: [OptionCode.go, .info, .listMetaContext])
    func anOverLongStringInAnOptionIsTheClientsViolation(code: OptionCode) {
        var data = ByteBuffer()
        data.writeInteger(UInt32(4097))
        data.writeRepeatingByte(0x61, count: 4097)
        data.writeInteger(UInt32(0))
        var bytes = ByteBuffer()
        bytes.writeInteger(NBDMagic.haveOption)
        bytes.writeInteger(code.rawValue)
        bytes.writeInteger(UInt32(data.readableBytes))
        bytes.writeImmutableBuffer(data)
        #expect {
            try OptionRequest.decode(from: &bytes)
        } throws: { error in
            (error as? NBDError)?.message == "protocol violation by the client: string of 4097 bytes exceeds 4096"
        }
    }

    @Test(arguments: [
        (OptionReply(option: .go, body: .ack), "0003e889045565a9 00000007 00000001 00000000"),
        (
            OptionReply(option: .list, body: .server(name: "disk", description: "my disk")),
            "0003e889045565a9 00000003 00000002 0000000f 00000004 6469736b 6d79206469736b"
        ),
        (
            OptionReply(option: .info, body: .info(.export(size: 1 << 30, flags: [.hasFlags, .sendFlush]))),
            "0003e889045565a9 00000006 00000003 0000000c 0000 0000000040000000 0005"
        ),
        (OptionReply(option: .go, body: .info(.name("n"))), "0003e889045565a9 00000007 00000003 00000003 0001 6e"),
        (OptionReply(option: .go, body: .info(.description("d"))), "0003e889045565a9 00000007 00000003 00000003 0002 64"),
        (
            OptionReply(option: .go, body: .info(.blockSize(BlockSizeConstraints(minimum: 512, preferred: 4096, maximum: 1 << 25)))),
            "0003e889045565a9 00000007 00000003 0000000e 0003 00000200 00001000 02000000"
        ),
        (
            OptionReply(option: .setMetaContext, body: .metaContext(id: 7, name: "base:allocation")),
            "0003e889045565a9 0000000a 00000004 00000013 00000007 626173653a616c6c6f636174696f6e"
        ),
        (OptionReply(option: .go, body: .error(.errUnknown, message: "no")), "0003e889045565a9 00000007 80000006 00000002 6e6f"),
        (OptionReply(option: .structuredReply, body: .error(.errUnsupported, message: "")), "0003e889045565a9 00000008 80000001 00000000"),
        (OptionReply(option: .go, body: .error(.errTLSRequired, message: "")), "0003e889045565a9 00000007 80000005 00000000"),
        (OptionReply(option: .go, body: .error(.errBlockSizeRequired, message: "")), "0003e889045565a9 00000007 80000008 00000000"),
        (
            OptionReply(option: .go, body: .error(OptionReplyType(rawValue: 0x8000_0063), message: "")),
            "0003e889045565a9 00000007 80000063 00000000"
        ),
    ])
    func optionReplies(reply: OptionReply, vector: String) throws {
        let bytes = hex(vector)
        #expect(encoded { reply.encode(into: &$0) } == bytes)
        #expect(try decodeBothWays(bytes) { try OptionReply.decode(from: &$0) } == reply)
    }

    @Test func everyOptionErrorHasItsSpecName() {
        let names = (1...10).map { OptionReplyType(rawValue: 0x8000_0000 | UInt32($0)).description }
        #expect(
            names == [
                "NBD_REP_ERR_UNSUP", "NBD_REP_ERR_POLICY", "NBD_REP_ERR_INVALID", "NBD_REP_ERR_PLATFORM",
                "NBD_REP_ERR_TLS_REQD", "NBD_REP_ERR_UNKNOWN", "NBD_REP_ERR_SHUTDOWN", "NBD_REP_ERR_BLOCK_SIZE_REQD",
                "NBD_REP_ERR_TOO_BIG", "NBD_REP_ERR_EXT_HEADER_REQD",
            ]
        )
        #expect(OptionReplyType(rawValue: 0x8000_0063).isError)
    }

    @Test func oversizedOptionReplyIsRefusedBeforeItsDataArrives() {
        // Header only: a 1 GiB reply length. The bound refuses it without waiting for the data.
        var buffer = ByteBuffer(bytes: hex("0003e889045565a9 00000003 00000002 40000000"))
        #expect(throws: NBDError.self) { try OptionReply.decode(from: &buffer) }
    }

    @Test func optionReplyWithBadMagicIsAViolation() {
        var buffer = ByteBuffer(bytes: hex("0003e889045565a8 00000003 00000001 00000000"))
        #expect { try OptionReply.decode(from: &buffer) } throws: { ($0 as? NBDError)?.code == .protocolViolation }
    }

    @Test func infoExportWithWrongLengthIsAViolation() {
        var buffer = ByteBuffer(bytes: hex("0003e889045565a9 00000006 00000003 0000000b 0000 0000000040000000 00"))
        #expect(throws: NBDError.self) { try OptionReply.decode(from: &buffer) }
    }

    @Test func exportNameReplyWithAndWithoutZeroes() throws {
        let short = hex("0000000000100000 0003")
        let reply = try decodeBothWays(short) { ExportNameReply.decode(from: &$0, noZeroes: true) }
        #expect(reply == ExportNameReply(size: 1 << 20, flags: [.hasFlags, .readOnly]))
        let long = short + [UInt8](repeating: 0, count: 124)
        #expect(try decodeBothWays(long) { ExportNameReply.decode(from: &$0, noZeroes: false) } == reply)
        #expect(encoded { reply.encode(into: &$0, noZeroes: false) } == long)
    }

    @Test func requestHeader() throws {
        let header = RequestHeader(flags: [.fua], type: .write, cookie: 0x0102_0304_0506_0708, offset: 4096, length: 512)
        let bytes = hex("25609513 0001 0001 0102030405060708 0000000000001000 00000200")
        #expect(encoded { header.encode(into: &$0) } == bytes)
        #expect(try decodeBothWays(bytes) { try RequestHeader.decode(from: &$0) } == header)
    }

    @Test func simpleReply() throws {
        let bytes = hex("67446698 0000001c 0000000000000009")
        let header = try decodeBothWays(bytes) { try ReplyHeader.decode(from: &$0) }
        #expect(header == .simple(SimpleReplyHeader(error: .ENOSPC, cookie: 9)))
        #expect(encoded { header.encode(into: &$0) } == bytes)
    }

    @Test func structuredReplyHeader() throws {
        let bytes = hex("668e33ef 0001 0001 0000000000000002 00000010")
        let header = try decodeBothWays(bytes) { try ReplyHeader.decode(from: &$0) }
        #expect(header == .structured(StructuredReplyHeader(flags: .done, type: .offsetData, cookie: 2, length: 16)))
    }

    @Test(arguments: [
        (ReplyChunkType.none, ReplyChunk.none, ""),
        (.offsetHole, .offsetHole(offset: 512, length: 4096), "0000000000000200 00001000"),
        (
            .blockStatus,
            .blockStatus(contextID: 1, descriptors: [BlockDescriptor(length: 4096, flags: 3), BlockDescriptor(length: 512, flags: 0)]),
            "00000001 00001000 00000003 00000200 00000000"
        ),
        // ERROR: error, message length, message.
        (.error, .error(.error, errno: .EIO, message: "bad", offset: nil), "00000005 0003 626164"),
        // ERROR_OFFSET in the spec's field order: error, message length, message, offset.
        (.errorOffset, .error(.errorOffset, errno: .EPERM, message: "x", offset: 1024), "00000001 0001 78 0000000000000400"),
    ])
    func structuredChunks(type: ReplyChunkType, chunk: ReplyChunk, vector: String) throws {
        let bytes = hex(vector)
        #expect(encoded { chunk.encode(into: &$0) } == bytes)
        var payload = ByteBuffer(bytes: bytes)
        #expect(try ReplyChunk.decode(type: type, payload: &payload) == chunk)
    }

    @Test(arguments: [
        (ReplyChunkType.none, "00"),
        (.offsetHole, "0000000000000200 00000000"),  // hole size 0
        (.offsetHole, "0000000000000200 0000100000"),  // length 13
        (.blockStatus, "00000001"),  // no descriptor
        (.blockStatus, "00000001 00000000 00000000"),  // zero-length extent
        (.error, "00000005 0009 626164"),  // message longer than the chunk
        (.error, "00000000 0000"),  // error value 0
        (ReplyChunkType(rawValue: 9), ""),  // unknown non-error type
    ])
    func malformedChunksAreViolations(type: ReplyChunkType, vector: String) {
        var payload = ByteBuffer(bytes: hex(vector))
        #expect { try ReplyChunk.decode(type: type, payload: &payload) } throws: { ($0 as? NBDError)?.code == .protocolViolation }
    }

    @Test func unknownErrorChunkIsStillAnError() throws {
        var payload = ByteBuffer(bytes: hex("0000001c 0000 deadbeef"))
        let chunk = try ReplyChunk.decode(type: ReplyChunkType(rawValue: 0x8009), payload: &payload)
        guard case .error(_, let errno, _, _) = chunk else {
            Issue.record("not an error")
            return
        }
        #expect(errno == .ENOSPC)
    }

    @Test func errnoNames() {
        #expect(
            [1, 5, 12, 22, 28, 75, 95, 108].map { NBDErrno(rawValue: $0).posixName } == [
                "EPERM", "EIO", "ENOMEM", "EINVAL", "ENOSPC", "EOVERFLOW", "ENOTSUP", "ESHUTDOWN",
            ]
        )
        #expect(NBDErrno(rawValue: 1234).isKnown == false)
    }
}

@Suite("How public values print")
struct DescriptionTests {
    @Test func flagsPrintByTheSpecsNames() {
        #expect("\(HandshakeFlags([.fixedNewstyle, .noZeroes]))" == "NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES")
        #expect("\(HandshakeFlags(rawValue: 0x8001))" == "NBD_FLAG_FIXED_NEWSTYLE | 0x8000")
        #expect("\(HandshakeFlags())" == "none")
        let flags = TransmissionFlags([.hasFlags, .readOnly, .sendFastZero])
        #expect("\(flags)" == "NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY | NBD_FLAG_SEND_FAST_ZERO")
        #expect("\(TransmissionFlags(rawValue: 0x8001))" == "NBD_FLAG_HAS_FLAGS | 0x8000")
        #expect("\(BlockSizeConstraints(minimum: 1, preferred: 4096, maximum: 65536))" == "minimum 1, preferred 4096, maximum 65536")
        #expect("\(NBDMetaContext(id: 3, name: "base:allocation"))" == "base:allocation (id 3)")
    }

    /// One type names a context in a configuration and in what a connection negotiated: the
    /// ids are each connection's own, so they do not take part in equality.
    @Test func metaContextsAreKnownByName() {
        let negotiated = NBDMetaContext(id: 7, name: "base:allocation")
        #expect(negotiated == .baseAllocation)
        #expect([NBDMetaContext(id: 2, name: "base:allocation")].contains(.baseAllocation))
        #expect(Set([negotiated, NBDMetaContext(id: 9, name: "base:allocation")]).count == 1)
        #expect(NBDMetaContext.dirtyBitmap("b0") == "qemu:dirty-bitmap:b0")
        #expect(NBDMetaContext.dirtyBitmap("b0").isDirtyBitmap && !NBDMetaContext.baseAllocation.isDirtyBitmap)
        #expect(NBDMetaContext.allocationDepth.name == "qemu:allocation-depth")
        #expect(NBDMetaContext("qemu:dirty-bitmap:b0") != .dirtyBitmap("b1"))
        #expect("\(NBDMetaContext.baseAllocation)" == "base:allocation")
    }
}
