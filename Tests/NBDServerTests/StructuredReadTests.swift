import NBD
import NIOCore
import Testing

@_spi(NBDMachines) @testable import NBDCore
@testable import NBDServer

/// How the built-in server frames a structured READ, decoded by the client's own machine.
@Suite("Built-in server: structured reads")
struct StructuredReadTests {
    /// Feeds the reply to a client machine holding one READ and returns what it reports.
    func decode(_ request: RequestHeader, _ parts: [NBDServerReadPart]) -> [ClientTransmissionStateMachine<Int>.Action] {
        var machine = ClientTransmissionStateMachine<Int>(configuration: .init(format: .structured))
        let header = machine.startRequest(.read, offset: request.offset, length: request.length, context: 1)
        var reply = ByteBuffer()
        let framing = ChunkFraming(
            request: RequestHeader(type: .read, cookie: header.cookie, offset: request.offset, length: request.length),
            format: .structured
        )
        for var buffer in ServerReply.chunkedRead(framing, parts: parts) {
            reply.writeBuffer(&buffer)
        }
        machine.feed(reply)
        var actions: [ClientTransmissionStateMachine<Int>.Action] = []
        while let action = machine.next() { actions.append(action) }
        return actions
    }

    @Test func consecutiveDataPartsGoOutAsOneChunkAndTheLastChunkIsDone() {
        let page1 = ByteBuffer(repeating: 1, count: 65536)
        let page2 = ByteBuffer(repeating: 2, count: 65536)
        let tail = ByteBuffer(repeating: 3, count: 4096)
        let request = RequestHeader(type: .read, cookie: 0, offset: 1 << 20, length: 65536 * 4 + 4096)
        let actions = decode(request, [.data(page1), .data(page2), .hole(2 * 65536), .data(tail)])
        guard actions.count == 4 else {
            Issue.record("expected data, hole, data, complete; got \(actions)")
            return
        }
        var both = page1
        both.writeImmutableBuffer(page2)
        guard case .data(_, let offset, let bytes) = actions[0] else {
            Issue.record("\(actions[0])")
            return
        }
        #expect(offset == 1 << 20 && bytes == both)
        guard case .hole(_, let holeOffset, let holeLength) = actions[1] else {
            Issue.record("\(actions[1])")
            return
        }
        #expect(holeOffset == (1 << 20) + 2 * 65536 && holeLength == 2 * 65536)
        guard case .data(_, let tailOffset, let tailBytes) = actions[2] else {
            Issue.record("\(actions[2])")
            return
        }
        #expect(tailOffset == (1 << 20) + 4 * 65536 && tailBytes == tail)
        // No NBD_REPLY_TYPE_NONE: the data chunk itself carried NBD_REPLY_FLAG_DONE.
        guard case .complete(_, let error) = actions[3] else {
            Issue.record("\(actions[3])")
            return
        }
        #expect(error == nil)
    }

    @Test func aTrailingHoleCarriesTheDoneFlag() {
        let request = RequestHeader(type: .read, cookie: 0, offset: 0, length: 8192)
        let actions = decode(request, [.data(ByteBuffer(repeating: 9, count: 4096)), .hole(4096)])
        #expect(actions.count == 3)
        if case .complete(_, let error)? = actions.last { #expect(error == nil) } else { Issue.record("\(actions)") }
    }
}
