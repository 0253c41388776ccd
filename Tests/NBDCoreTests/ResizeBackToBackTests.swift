import NIOCore
@_spi(NBDMachines) import TestSupport
import Testing

@_spi(NBDMachines) @testable import NBDCore

/// `NBD_CMD_RESIZE` between the client and server machines, back to back: the client's barrier
/// ("Clients MUST NOT issue requests for offsets in the area between the old and new sizes
/// between the time this request is issued and the reply has been received ... clients MUST
/// also make sure that no such requests are outstanding when the resize request is sent") and
/// the size both sides keep afterwards.
@Suite("Resize, back to back")
struct ResizeBackToBackTests {
    static let size = Pair.size

    /// The requests the server was handed and has not answered, by command and offset.
    func onTheServer(_ pair: Pair) -> [String] {
        pair.performing.map { "\($0.0.type) \($0.0.offset)" }.sorted()
    }

    @Test func aGrowHoldsBackRequestsPastTheOldEndUntilItsReply() throws {
        var pair = Pair(seed: 21)
        try pair.open("resizable")
        pair.holding = true
        let resize = pair.submit(.resize, offset: 2 * Self.size, length: 0)
        try pair.settle()
        #expect(onTheServer(pair) == ["NBD_CMD_RESIZE \(2 * Self.size)"])
        // Past the old end: held by the client until the resize is answered. Elsewhere: sent.
        let beyond = pair.submit(.write, offset: Self.size + 4096, length: 4, payload: ByteBuffer(bytes: [1, 2, 3, 4]))
        let inside = pair.submit(.read, offset: 0, length: 512)
        try pair.settle()
        #expect(onTheServer(pair) == ["NBD_CMD_READ 0", "NBD_CMD_RESIZE \(2 * Self.size)"])
        pair.holding = false
        try pair.settle()
        #expect(resize.isDone && resize.error == nil && inside.error == nil)
        #expect(beyond.isDone && beyond.error == nil)
        #expect(pair.client.exportSize == 2 * Self.size)
        let back = pair.submit(.read, offset: Self.size + 4096, length: 4)
        try pair.settle()
        #expect(Array(back.data.readableBytesView) == [1, 2, 3, 4])
    }

    @Test func aShrinkWaitsForRequestsInTheCutThenItsEndBoundsBothSides() throws {
        var pair = Pair(seed: 22)
        try pair.open("resizable")
        pair.holding = true
        let cut = pair.submit(.read, offset: Self.size - 4096, length: 4096)
        let kept = pair.submit(.read, offset: 0, length: 4096)
        try pair.settle()
        let resize = pair.submit(.resize, offset: Self.size / 2, length: 0)
        // Submitted after the resize: waits for it to be sent, wherever it goes.
        let after = pair.submit(.read, offset: 4096, length: 4096)
        try pair.settle()
        // The read in the bytes a shrink removes is on the wire: the resize waits.
        #expect(onTheServer(pair) == ["NBD_CMD_READ 0", "NBD_CMD_READ \(Self.size - 4096)"])
        pair.holding = false
        try pair.settle()
        #expect(cut.error == nil && kept.error == nil && resize.error == nil && after.error == nil)
        #expect(pair.client.exportSize == Self.size / 2)
        #expect(pair.storage.count == Int(Self.size / 2))
        // The new end: the client refuses past it, sending nothing.
        let past = pair.submit(.read, offset: Self.size / 2, length: 512)
        try pair.settle()
        #expect(past.error?.code == .invalidArgument && past.error?.serverErrno == nil)
    }

    @Test func aRefusedResizeLeavesTheSizeAndReleasesWhatWaited() throws {
        var pair = Pair(seed: 23)
        try pair.open("resizable")
        pair.holding = true
        // Beyond what the server can hold: it refuses with ENOSPC.
        let resize = pair.submit(.resize, offset: 2 * Pair.largestSize, length: 0)
        try pair.settle()
        let past = pair.submit(.write, offset: Self.size, length: 4, payload: ByteBuffer(bytes: [9, 9, 9, 9]))
        try pair.settle()
        pair.holding = false
        try pair.settle()
        #expect(resize.error?.serverErrno == .ENOSPC)
        #expect(pair.client.exportSize == Self.size)
        // Held until the refusal, then refused at the end that stands.
        #expect(past.error?.code == .invalidArgument && past.error?.serverErrno == nil)
    }

    /// "Clients MUST NOT send a resize request unless the NBD_FLAG_SEND_RESIZE flag was set":
    /// refused by the client's machine, with nothing sent.
    @Test func noResizeWithoutTheFlag() throws {
        var pair = Pair(seed: 26)
        try pair.open("disk")
        pair.holding = true
        let resize = pair.submit(.resize, offset: 2 * Self.size, length: 0)
        try pair.settle()
        #expect(pair.performing.isEmpty)
        #expect(resize.error?.code == .notAdvertised && resize.error?.message.contains("NBD_FLAG_SEND_RESIZE") == true)
    }

    @Test func resizesGoOneAtATimeInOrder() throws {
        var pair = Pair(seed: 24)
        try pair.open("resizable")
        pair.holding = true
        let first = pair.submit(.resize, offset: 3 * Self.size, length: 0)
        let second = pair.submit(.resize, offset: Self.size / 4, length: 0)
        try pair.settle()
        #expect(onTheServer(pair) == ["NBD_CMD_RESIZE \(3 * Self.size)"])
        pair.holding = false
        try pair.settle()
        #expect(first.error == nil && second.error == nil)
        #expect(pair.client.exportSize == Self.size / 4)
    }

    @Test func aCancelledResizeInTheQueueReleasesWhatWaitedBehindIt() throws {
        var pair = Pair(seed: 25, maximumInFlight: 1)
        try pair.open("resizable")
        pair.holding = true
        let first = pair.submit(.read, offset: 0, length: 512)
        let resize = pair.submit(.resize, offset: 2 * Self.size, length: 0)
        let behind = pair.submit(.read, offset: 512, length: 512)
        try pair.settle()
        pair.client.requestCancelled(resize)
        pair.holding = false
        try pair.settle()
        #expect(first.error == nil && behind.error == nil && behind.isDone)
        #expect(pair.client.exportSize == Self.size)
    }
}
