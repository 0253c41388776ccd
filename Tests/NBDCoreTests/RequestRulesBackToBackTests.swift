import NIOCore
@_spi(NBDMachines) import TestSupport
import Testing

@_spi(NBDMachines) @testable import NBDCore

/// How the client's connection machine puts a request on the wire, against the server's
/// machine: in pieces at the maximum payload, whole with extended headers and again in pieces
/// after `EOVERFLOW`, block status cut at 4 GiB without them.
@Suite("Request rules, back to back")
struct RequestRulesBackToBackTests {
    typealias Machine = ClientConnectionStateMachine<Pair.Request, Pair.Waiter>

    /// What the server was handed, as "COMMAND offset+length".
    func performed(_ pair: Pair) -> [String] {
        pair.performed.map { "\($0.type) \($0.offset)+\($0.length)" }
    }

    @Test func readsAndWritesGoInPiecesOfTheMaximumPayload() throws {
        var pair = Pair(seed: 31)
        try pair.open("small-payload", options: [.structuredReply])
        let data = (0..<150_000).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        let write = pair.submit(.write, offset: 1000, length: UInt64(data.count), payload: ByteBuffer(bytes: data))
        try pair.settle()
        #expect(write.isDone && write.error == nil)
        // 64 KiB, 64 KiB, and the rest: each with its own share of the data.
        #expect(performed(pair) == ["NBD_CMD_WRITE 1000+65536", "NBD_CMD_WRITE 66536+65536", "NBD_CMD_WRITE 132072+18928"])
        let read = pair.submit(.read, offset: 1000, length: UInt64(data.count))
        try pair.settle()
        #expect(read.isDone && read.error == nil)
        #expect(Array(read.data.readableBytesView) == data)
        #expect(performed(pair).count == 6)
    }

    @Test func aRequestInPiecesCompletesOnceWithTheFirstError() throws {
        var pair = Pair(seed: 32)
        pair.badSector = 70_000
        try pair.open("small-payload", options: [.structuredReply])
        let read = pair.submit(.read, offset: 0, length: 200_000)
        try pair.settle()
        // Every piece was sent and answered; the one at the bad sector failed the read.
        #expect(performed(pair).count == 4)
        #expect(read.isDone && read.error?.serverErrno == .EIO)
        #expect(read.error?.message.contains("65536 bytes at offset 65536") == true)
    }

    @Test func extendedHeadersSendATrimWholeAndAgainInPiecesAfterEOVERFLOW() throws {
        var pair = Pair(seed: 33)
        try pair.connect()
        #expect(try pair.option(.extendedHeaders) == [.ack])
        _ = try pair.go("huge")
        let trim = pair.submit(.trim, offset: 0, length: 6 << 30)
        try pair.settle()
        #expect(trim.isDone && trim.error == nil)
        let largest = Machine.largestEffectLength
        #expect(
            performed(pair) == [
                "NBD_CMD_TRIM 0+\(6 << 30)", "NBD_CMD_TRIM 0+\(largest)", "NBD_CMD_TRIM \(largest)+\((6 << 30) - largest)",
            ]
        )
    }

    @Test func withoutExtendedHeadersLongRangesGoInPiecesUnder4GiB() throws {
        var pair = Pair(seed: 34)
        try pair.open("huge", options: [.structuredReply, .setMetaContext(export: "huge", queries: ["base:allocation"])])
        let largest = Machine.largestEffectLength
        let zero = pair.submit(.writeZeroes, offset: 0, length: 6 << 30)
        try pair.settle()
        #expect(zero.isDone && zero.error == nil)
        #expect(performed(pair) == ["NBD_CMD_WRITE_ZEROES 0+\(largest)", "NBD_CMD_WRITE_ZEROES \(largest)+\((6 << 30) - largest)"])
        // Block status asks for at most 4 GiB of the range; the caller asks again from the end.
        let status = pair.submit(.blockStatus, offset: 0, length: 6 << 30)
        try pair.settle()
        #expect(status.isDone && status.error == nil)
        #expect(performed(pair).last == "NBD_CMD_BLOCK_STATUS 0+\(largest)")
    }
}

extension RequestRulesBackToBackTests {
    /// Whether the client machine keeps no piece count for any request.
    func noSplitsLeft(_ pair: Pair) -> Bool {
        if case .transmission(let state) = pair.client.phase { state.splits.isEmpty } else { false }
    }

    /// A read in pieces whose later piece meets a shrink (past the new end as it would go on
    /// the wire) is answered once every piece is: not while the first is still on the server.
    @Test func aPieceCutOffByAShrinkAnswersOnlyAfterTheOthers() throws {
        var pair = Pair(seed: 35)
        try pair.open("resizable")
        let grow = pair.submit(.resize, offset: 4 << 20, length: 0)
        try pair.settle()
        #expect(grow.error == nil)
        pair.holding = true
        let shrink = pair.submit(.resize, offset: 1 << 20, length: 0)
        try pair.settle()
        // Two pieces of 1 MiB: the first goes, the second (in the bytes cut) waits for the resize.
        let read = pair.submit(.read, offset: 0, length: 2 << 20)
        try pair.settle()
        #expect(pair.performing.map { "\($0.0.type) \($0.0.offset)" }.sorted() == ["NBD_CMD_READ 0", "NBD_CMD_RESIZE 1048576"])
        // The shrink is answered first: the second piece is past the end now.
        let index = try #require(pair.performing.firstIndex { $0.0.type == .resize })
        let (request, data, sparse) = pair.performing.remove(at: index)
        pair.server.requestCompleted(request, pair.perform(request, data: data, sparse: sparse))
        try pair.settle()
        #expect(shrink.isDone && shrink.error == nil)
        #expect(!read.isDone, "the read was answered with its first piece still on the server")
        pair.holding = false
        try pair.settle()
        #expect(read.isDone && read.error?.code == .invalidArgument)
        #expect(noSplitsLeft(pair))
    }

    /// A whole trim cancelled while on the wire, answered with `EOVERFLOW`, is not sent
    /// again in pieces: a cancelled request never goes on the wire again.
    @Test func aCancelledTrimAnsweredWithEOVERFLOWIsNotSentAgain() throws {
        var pair = Pair(seed: 36)
        try pair.connect()
        #expect(try pair.option(.extendedHeaders) == [.ack])
        _ = try pair.go("huge")
        pair.holding = true
        let trim = pair.submit(.trim, offset: 0, length: 6 << 30)
        try pair.settle()
        #expect(performed(pair) == ["NBD_CMD_TRIM 0+\(6 << 30)"])
        pair.client.requestCancelled(trim)
        pair.holding = false
        try pair.settle()
        #expect(performed(pair) == ["NBD_CMD_TRIM 0+\(6 << 30)"])
        #expect(noSplitsLeft(pair))
    }
}
