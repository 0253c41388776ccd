import NIOCore
import Testing

@_spi(NBDMachines) @testable import NBDCore

/// What a server connection may hold, and for how long: back-pressure and deadlines.
@Suite("Server state machines: memory bounds and deadlines")
struct ServerBoundsTests {
    static let export = ServerNegotiationStateMachine.Export(
        name: "",
        size: 64 << 20,
        flags: [.hasFlags, .sendFlush, .sendTrim, .sendWriteZeroes],
        blockSizes: BlockSizeConstraints(minimum: 1, preferred: 4096, maximum: 65536)
    )

    func transmission(bound: Int = 128 << 10) -> ServerTransmissionStateMachine {
        let agreement = ServerNegotiationStateMachine.Agreement(
            export: Self.export,
            flags: Self.export.flags,
            format: .simple,
            metaContexts: []
        )
        let limits = ServerTransmissionStateMachine.Limits(
            maximumPayload: 65536,
            maximumRequestsInFlight: 1024,
            maximumBufferedBytes: bound,
            replyStallTimeout: .seconds(60)
        )
        return ServerTransmissionStateMachine(agreement: agreement, limits: limits)
    }

    func requests(_ type: CommandType, count: Int, length: UInt32 = 65536, withData: Bool = false) -> ByteBuffer {
        var buffer = ByteBuffer()
        for index in 0..<count {
            RequestHeader(type: type, cookie: NBDCookie(UInt64(index)), offset: UInt64(index) * UInt64(length), length: UInt64(length))
                .encode(
                    into: &buffer
                )
            if withData { buffer.writeRepeatingByte(UInt8(index), count: Int(length)) }
        }
        return buffer
    }

    /// Every action until the machine waits.
    func drain(_ machine: inout ServerTransmissionStateMachine) -> [ServerTransmissionStateMachine.Action] {
        var actions: [ServerTransmissionStateMachine.Action] = []
        while let action = machine.next() { actions.append(action) }
        return actions
    }

    func performed(_ actions: [ServerTransmissionStateMachine.Action]) -> [RequestHeader] {
        actions.compactMap { if case .perform(let header, _) = $0 { header } else { nil } }
    }

    func names(_ actions: [ServerTransmissionStateMachine.Action]) -> [String] {
        actions.map { action in
            switch action {
            case .perform: "perform"
            case .write: "write"
            case .pauseReading: "pause"
            case .resumeReading: "resume"
            case .reserveMemory: "reserve"
            case .adjustMemory: "adjust"
            case .armTimer: "arm"
            case .cancelTimer: "cancel"
            case .close: "close"
            case .fatal: "fatal"
            }
        }
    }

    func written(_ actions: [ServerTransmissionStateMachine.Action]) -> [Int] {
        actions.compactMap { if case .write(let buffers) = $0 { buffers.reduce(0) { $0 + $1.readableBytes } } else { nil } }
    }

    @Test func readsStopAtTheBoundAndResumeOnceRepliesAreWrittenDownToHalf() {
        var machine = transmission()
        // 64 READs of 64 KiB in one go: only two replies' worth fit in 128 KiB.
        machine.bytesReceived(requests(.read, count: 64))
        var actions = drain(&machine)
        #expect(names(actions) == ["perform", "perform", "pause", "arm"])
        #expect(machine.heldBytes == 128 << 10)
        let first = performed(actions)
        for header in first { machine.requestCompleted(header, .data([.data(ByteBuffer(repeating: 1, count: 65536))])) }
        actions = drain(&machine)
        #expect(names(actions) == ["write", "write"])
        let sizes = written(actions)
        // The first reply written leaves more than half of the bound held: still paused.
        machine.bytesWritten(sizes[0])
        #expect(names(drain(&machine)).isEmpty)
        machine.bytesWritten(sizes[1])
        actions = drain(&machine)
        #expect(names(actions) == ["resume", "cancel", "perform", "perform", "pause", "arm"])
        #expect(performed(actions).map(\.cookie) == [2, 3])
    }

    @Test func writeDataIsBoundedTheSameWay() {
        var machine = transmission()
        machine.bytesReceived(requests(.write, count: 8, withData: true))
        let actions = drain(&machine)
        #expect(names(actions) == ["perform", "perform", "pause", "arm"])
        #expect(machine.heldBytes == 128 << 10)
        // Stored: the data is let go, the two short replies count until written, and go out
        // in one write once the machine has nothing else to do.
        for header in performed(actions) { machine.requestCompleted(header, .done) }
        let replies = drain(&machine)
        #expect(names(replies) == ["resume", "cancel", "perform", "perform", "pause", "arm", "write"])
        #expect(written(replies) == [32])
    }

    @Test func aChannelThatIsNotWritablePausesReading() {
        var machine = transmission()
        machine.writabilityChanged(false)
        machine.bytesReceived(requests(.read, count: 1))
        #expect(names(drain(&machine)) == ["pause", "arm"])
        machine.writabilityChanged(true)
        #expect(names(drain(&machine)) == ["resume", "cancel", "perform"])
    }

    @Test func aClientThatReadsNoRepliesIsClosedAtTheDeadlineButOneThatReadsIsKept() {
        var machine = transmission()
        machine.bytesReceived(requests(.read, count: 8))
        let actions = drain(&machine)
        for header in performed(actions) { machine.requestCompleted(header, .data([.data(ByteBuffer(repeating: 1, count: 65536))])) }
        let sizes = written(drain(&machine))
        // Some progress during the first period: the deadline starts again.
        machine.bytesWritten(sizes[0] / 2)
        machine.timerFired()
        #expect(names(drain(&machine)) == ["arm"])
        // None during the second: closed.
        machine.timerFired()
        let end = drain(&machine)
        guard case .fatal(let error)? = end.first else {
            Issue.record("a client that reads nothing was kept: \(names(end))")
            return
        }
        #expect(error.code == .timedOut && error.message == "the client read none of its replies for 60 s")
    }

    @Test func aSlowBackendIsNotTheClientsFault() {
        var machine = transmission()
        machine.bytesReceived(requests(.read, count: 8))
        #expect(names(drain(&machine)) == ["perform", "perform", "pause", "arm"])
        // Nothing to write yet: the deadline only starts again.
        machine.timerFired()
        #expect(names(drain(&machine)) == ["arm"])
    }

    @Test func theHandshakeHasADeadlineThatGoEnds() {
        let limits = ServerTransmissionStateMachine.Limits(maximumPayload: 65536, maximumRequestsInFlight: 16)
        var silent = ServerConnectionStateMachine(
            exports: [Self.export],
            maximumOptionLength: 1024,
            limits: limits,
            handshakeTimeout: .seconds(3)
        )
        silent.channelActive()
        guard case .write? = silent.next(), case .armTimer(let delay)? = silent.next() else {
            Issue.record("no greeting and deadline")
            return
        }
        #expect(delay == .seconds(3))
        silent.timerFired()
        guard case .fatal(let error)? = silent.next() else {
            Issue.record("a silent client was kept past the deadline")
            return
        }
        #expect(error.code == .timedOut && error.message == "the client did not finish negotiating within 3 s")

        var prompt = ServerConnectionStateMachine(exports: [Self.export], maximumOptionLength: 1024, limits: limits)
        prompt.channelActive()
        _ = prompt.next()
        _ = prompt.next()
        var bytes = ByteBuffer(integer: ClientFlags([.fixedNewstyle, .noZeroes]).rawValue)
        OptionRequest.go(export: "", requests: []).encode(into: &bytes)
        prompt.bytesReceived(bytes)
        var sawCancel = false
        while let action = prompt.next() {
            if case .cancelTimer = action { sawCancel = true }
        }
        #expect(sawCancel)
        // A late timer (already on its way) does nothing in transmission with nothing paused.
        prompt.timerFired()
        #expect(prompt.next() == nil)
    }
}

/// A connection under a server-wide memory budget: it asks before it takes what a client
/// dictates, reads nothing while it waits, and gives everything back, even once closed.
@Suite("Server state machines: the memory budget")
struct ServerMemoryBudgetTests {
    let bounds = ServerBoundsTests()

    func transmission() -> ServerTransmissionStateMachine {
        let agreement = ServerNegotiationStateMachine.Agreement(
            export: ServerBoundsTests.export,
            flags: ServerBoundsTests.export.flags,
            format: .simple,
            metaContexts: []
        )
        let limits = ServerTransmissionStateMachine.Limits(
            maximumPayload: 65536,
            maximumRequestsInFlight: 1024,
            maximumBufferedBytes: 8 << 20,
            memoryBudgetCredit: 0
        )
        return ServerTransmissionStateMachine(agreement: agreement, limits: limits)
    }

    /// Every action until the machine waits, with the budget's answers given as a server would.
    func drain(
        _ machine: inout ServerTransmissionStateMachine,
        _ ledger: inout MemoryBudgetLedger
    ) -> [ServerTransmissionStateMachine.Action] {
        var actions: [ServerTransmissionStateMachine.Action] = []
        while let action = machine.next() {
            actions.append(action)
            switch action {
            case .reserveMemory(let amount): if ledger.reserve(0, amount) { machine.memoryGranted() }
            case .adjustMemory(let delta):
                if ledger.adjust(0, by: delta).contains(0) { machine.memoryGranted() }
            default: break
            }
        }
        return actions
    }

    /// `reads` READs of 64 KiB on a connection of a 256 KiB budget for 2 (a floor of 64 KiB
    /// each, 128 KiB shared), while the other connection holds its floor and `shared` bytes:
    /// the first READ fits the floor, the second needs more of the shared half than is left.
    func secondReadWaiting(
        otherHoldsShared shared: Int,
        reads: Int
    ) -> (ServerTransmissionStateMachine, MemoryBudgetLedger, [ServerTransmissionStateMachine.Action]) {
        var machine = transmission()
        var ledger = MemoryBudgetLedger(capacity: 256 << 10, holders: 2)
        let otherGranted = ledger.reserve(1, 64 << 10 + shared)
        #expect(otherGranted)
        machine.bytesReceived(bounds.requests(.read, count: reads))
        let actions = drain(&machine, &ledger)
        #expect(bounds.names(actions) == ["reserve", "perform", "reserve", "pause", "arm"])
        #expect(ledger.total == 128 << 10 + shared)
        return (machine, ledger, actions)
    }

    @Test func readsWaitUnreadUntilTheBudgetGrantsTheirReplies() {
        var (machine, ledger, actions) = secondReadWaiting(otherHoldsShared: 100 << 10, reads: 4)
        // The other connection lets go: the budget grants the wait, and the READ goes on.
        let granted = ledger.adjust(1, by: -(100 << 10))
        #expect(granted == [0])
        machine.memoryGranted()
        actions = drain(&machine, &ledger)
        // The third fits the share of the shared half; the fourth would pass it, and waits for
        // this connection's own requests to end.
        #expect(bounds.names(actions) == ["resume", "cancel", "perform", "reserve", "perform", "reserve", "pause", "arm"])
        #expect(bounds.performed(actions).map(\.cookie) == [1, 2])
    }

    /// A connection that waits gives back what its requests free meanwhile: were it to keep
    /// its credit, connections waiting for room could wait for each other for ever.
    @Test func aWaitingConnectionGivesBackWhatItFrees() {
        var (machine, ledger, actions) = secondReadWaiting(otherHoldsShared: 128 << 10, reads: 2)
        // The first READ ends and its reply is written: the 64 KiB go back at once, and the
        // waiting READ takes them.
        machine.requestCompleted(bounds.performed(actions)[0], .data([.data(ByteBuffer(repeating: 1, count: 65536))]))
        let reply = bounds.written(drain(&machine, &ledger))
        machine.bytesWritten(reply[0])
        let after = drain(&machine, &ledger)
        #expect(bounds.names(after) == ["adjust", "resume", "cancel", "perform"], "\(bounds.names(after))")
        #expect(ledger.holding(0) == 64 << 10)
    }

    @Test func aClosedConnectionGivesBackAllItHeldAsItsRequestsEnd() {
        var machine = transmission()
        var ledger = MemoryBudgetLedger(capacity: 64 << 20, holders: 4)
        // Reads, and writes whose data is half here when the connection closes.
        var bytes = bounds.requests(.read, count: 6)
        for index in 0..<3 {
            RequestHeader(type: .write, cookie: NBDCookie(UInt64(100 + index)), offset: UInt64(index) << 16, length: 65536).encode(
                into: &bytes
            )
            bytes.writeRepeatingByte(7, count: 65536)
        }
        bytes.moveWriterIndex(to: bytes.writerIndex - 40000)
        machine.bytesReceived(bytes)
        let actions = drain(&machine, &ledger)
        let performed = bounds.performed(actions)
        #expect(performed.count == 8)
        // Two requests complete and their replies go out, one of them written before the end.
        machine.requestCompleted(performed[0], .data([.data(ByteBuffer(repeating: 1, count: 65536))]))
        machine.requestCompleted(performed[6], .done)
        let replies = bounds.written(drain(&machine, &ledger))
        machine.bytesWritten(replies[0])
        #expect(ledger.total > 0)
        machine.channelClosed()
        _ = drain(&machine, &ledger)
        // The rest end after the close; the reply handed out fails with the connection.
        for index in performed.indices where index != 0 && index != 6 { machine.requestCompleted(performed[index], .done) }
        machine.bytesWritten(replies[1])
        _ = drain(&machine, &ledger)
        #expect(ledger.total == 0, "\(ledger.total) bytes still counted")
        #expect(machine.heldBytes == 0)
    }
}
