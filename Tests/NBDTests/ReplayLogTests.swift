@_spi(NBDMachines) import NBDCore
import NIOCore
import Testing

@testable import NBD

/// The replay log of NBDClient: what a server answered and did not flush is kept until a
/// flush covers it, sent again after a reconnection before anything else, and said to be in
/// doubt when the window is off.
@Suite("NBDClient replay log")
struct ReplayLogTests {
    typealias Machine = NBDClient.StateMachine<Int, String>
    let t0 = ContinuousClock.now
    let identity = ExportIdentity(
        size: 1 << 30,
        flags: [.hasFlags, .canMultiConn, .sendFlush],
        format: .structured,
        metaContexts: []
    )
    let lost = NBDError(.connectionClosed, "reset", connectionUsable: false)

    func running(connections: Int = 2, window: Int = 1 << 20) -> Machine {
        var machine = Machine(
            configuration: .init(connections: connections, reconnectDelay: .seconds(10), maximumAdmitted: 16, replayWindow: window)
        )
        _ = machine.start(now: t0)
        for slot in 0..<connections {
            _ = machine.dialSucceeded(slot: slot, connection: 100 + slot, identity: identity, canMultiConn: true, now: t0)
        }
        return machine
    }

    func data(_ count: Int, _ byte: UInt8) -> ReplayLog.Operation { .write([ByteBuffer(repeating: byte, count: count)], flags: []) }

    /// A write leased and answered: logged.
    @discardableResult
    func answer(_ machine: inout Machine, _ operation: ReplayLog.Operation, at offset: UInt64, length: UInt64) -> [Machine.Action] {
        guard let lease = machine.tryLease(weight: 0, onLoop: nil) else {
            Issue.record("no lease")
            return []
        }
        return machine.released(lease, weight: 0, answered: (operation, offset, length))
    }

    /// One write answered, the connection lost and back: the replay that follows, or nil
    /// (recorded as an issue).
    func oneWriteReplayed(_ machine: inout Machine) -> (Machine.Lease, through: Int)? {
        answer(&machine, data(4096, 1), at: 0, length: 4096)
        _ = machine.connectionLost(slot: 0, generation: 1, cause: lost, now: t0)
        let back = machine.dialSucceeded(slot: 0, connection: 200, identity: identity, canMultiConn: true, now: t0)
        guard let (lease, _, through) = replays(back).first else {
            Issue.record("no replay: \(back)")
            return nil
        }
        return (lease, through)
    }

    func replays(_ actions: [Machine.Action]) -> [(Machine.Lease, [ReplayLog.Entry], Int)] {
        actions.compactMap { if case .replay(let lease, let entries, let through) = $0 { (lease, entries, through) } else { nil } }
    }

    @Test func aFlushCoversWhatWasAnsweredBeforeItWasSent() {
        var machine = running()
        answer(&machine, data(4096, 1), at: 0, length: 4096)
        answer(&machine, data(4096, 2), at: 4096, length: 4096)
        let sent = machine.log.lastSequence
        answer(&machine, data(4096, 3), at: 8192, length: 4096)  // after the flush was sent
        #expect(machine.flushed(through: sent) == nil)
        #expect(machine.log.entries.map(\.offset) == [8192])
        #expect(machine.log.bytes == 4096)
    }

    /// A reconnection holds every request until the log went again, in the order answered,
    /// without what a later entry wholly overwrote, and was flushed; then waiters go on.
    @Test func aReconnectionSendsTheLogAgainBeforeAnythingElse() {
        var machine = running()
        answer(&machine, data(4096, 1), at: 0, length: 4096)
        answer(&machine, .writeZeroes(flags: []), at: 65536, length: 8192)
        answer(&machine, data(8192, 2), at: 0, length: 8192)  // overwrites the first whole
        answer(&machine, .trim, at: 1 << 20, length: 4096)
        // The server restarts: both connections are lost and come back.
        _ = machine.connectionLost(slot: 0, generation: 1, cause: lost, now: t0)
        _ = machine.connectionLost(slot: 1, generation: 1, cause: lost, now: t0)
        guard case .wait = machine.lease(id: 1, waiter: "read", weight: 4096) else {
            Issue.record("a request went on with no connection")
            return
        }
        let back = machine.dialSucceeded(slot: 0, connection: 200, identity: identity, canMultiConn: true, now: t0 + .seconds(1))
        let replay = replays(back)
        #expect(replay.count == 1)
        #expect(!back.contains { if case .resume = $0 { true } else { false } }, "a waiter went before the replay")
        guard let (lease, entries, through) = replay.first else { return }
        #expect(lease.connection == 200)
        #expect(entries.map(\.offset) == [65536, 0, 1 << 20])
        #expect(through == 4)
        // Nothing else meanwhile, not even on the second connection once it is back.
        let second = machine.dialSucceeded(slot: 1, connection: 201, identity: identity, canMultiConn: true, now: t0 + .seconds(1))
        #expect(replays(second).isEmpty && !second.contains { if case .resume = $0 { true } else { false } })
        #expect(machine.tryLease(weight: 0, onLoop: nil) == nil)
        let done = machine.replayFinished(lease, through: through, error: nil)
        #expect(done.contains { if case .emit(.replayed(requests: 3, bytes: 8192)) = $0 { true } else { false } }, "\(done)")
        #expect(done.contains { if case .resume("read", _) = $0 { true } else { false } }, "\(done)")
        #expect(machine.log.isEmpty && machine.log.bytes == 0)
    }

    /// A replay whose connection is lost goes again on the next one; nothing is dropped.
    @Test func aReplayCutOffGoesAgain() {
        var machine = running(connections: 1)
        guard let (first, through) = oneWriteReplayed(&machine) else { return }
        _ = machine.connectionLost(slot: 0, generation: first.generation, cause: lost, now: t0)
        #expect(machine.replayFinished(first, through: through, error: lost).isEmpty)
        #expect(machine.log.entries.count == 1)
        let again = replays(machine.dialSucceeded(slot: 0, connection: 300, identity: identity, canMultiConn: true, now: t0))
        #expect(again.map(\.0.connection) == [300] && again.first?.1.map(\.offset) == [0])
    }

    /// A flush answered once a replay has begun (its lease went back first, which let the
    /// replay start) does not empty the log: the replay may stop after sending an older entry
    /// over a newer one, and then every entry must go again.
    @Test func aFlushAnsweredDuringAReplayKeepsWhatTheReplaySends() {
        var machine = running(connections: 2)
        answer(&machine, .trim, at: 0, length: 8192)
        answer(&machine, data(4096, 2), at: 4096, length: 4096)  // over half of the trim
        guard let flush = machine.tryLease(weight: 0, onLoop: nil) else {
            Issue.record("no lease")
            return
        }
        let covered = machine.log.lastSequence
        // The other connection is lost and back: a replay is due once the flush is answered.
        _ = machine.connectionLost(slot: 1 - flush.slot, generation: 1, cause: lost, now: t0)
        _ = machine.dialSucceeded(slot: 1 - flush.slot, connection: 300, identity: identity, canMultiConn: true, now: t0)
        guard let (replay, entries, through) = replays(machine.released(flush, weight: 0)).first else {
            Issue.record("no replay once the flush was answered")
            return
        }
        #expect(entries.map(\.offset) == [0, 4096])
        #expect(machine.flushed(through: covered) == nil)
        // The replay stops after the trim: the write over it must go again too.
        _ = machine.connectionLost(slot: replay.slot, generation: replay.generation, cause: lost, now: t0)
        // It goes again at once on the connection still up.
        let again = replays(machine.replayFinished(replay, through: through, error: lost))
        #expect(again.first?.1.map(\.offset) == [0, 4096], "\(again.map(\.1))")
    }

    /// A server that refuses a write it had answered before ends the client: what it holds is
    /// not what was answered.
    @Test func aReplayRefusedEndsTheClient() {
        var machine = running(connections: 1)
        guard let (lease, through) = oneWriteReplayed(&machine) else { return }
        let refused = NBDError(.serverError, "write failed", serverErrno: .EIO, connectionUsable: true)
        let actions = machine.replayFinished(lease, through: through, error: refused)
        let ending = actions.compactMap { if case .finish(let error) = $0 { error } else { nil } }
        #expect(ending.first?.code == .unavailable && ending.first?.message.contains("could not be sent again") == true)
    }

    /// Past the window the client flushes by itself, once at a time, and the flush drops what
    /// it covered.
    @Test func pastTheWindowTheClientFlushes() {
        var machine = running(window: 10_000)
        #expect(!answer(&machine, data(6000, 1), at: 0, length: 6000).contains { if case .flushLog = $0 { true } else { false } })
        #expect(answer(&machine, data(6000, 2), at: 6000, length: 6000).contains { if case .flushLog = $0 { true } else { false } })
        let sent = machine.log.lastSequence
        #expect(!answer(&machine, data(6000, 3), at: 12000, length: 6000).contains { if case .flushLog = $0 { true } else { false } })
        _ = machine.logFlushed(through: sent)
        #expect(machine.log.bytes == 6000)
        #expect(answer(&machine, data(6000, 4), at: 18000, length: 6000).contains { if case .flushLog = $0 { true } else { false } })
    }

    /// With the window off nothing is sent again: the first flush after a reconnection names
    /// the ranges in doubt, the next one nothing.
    @Test func withTheWindowOffAFlushNamesTheRangesInDoubt() {
        var machine = running(connections: 1, window: 0)
        answer(&machine, data(4096, 1), at: 0, length: 4096)
        answer(&machine, data(4096, 1), at: 4096, length: 4096)
        answer(&machine, .writeZeroes(flags: []), at: 1 << 20, length: 512)
        #expect(machine.log.bytes == 0)
        _ = machine.connectionLost(slot: 0, generation: 1, cause: lost, now: t0)
        let back = machine.dialSucceeded(slot: 0, connection: 200, identity: identity, canMultiConn: true, now: t0)
        #expect(replays(back).isEmpty)
        let expected: [Range<UInt64>] = [0..<8192, (1 << 20)..<((1 << 20) + 512)]
        #expect(machine.flushed(through: machine.log.lastSequence)?.ranges == expected)
        #expect(machine.flushed(through: machine.log.lastSequence) == nil)
    }

    /// Without a reconnect delay, or on a server that cannot flush, nothing is kept.
    /// A FUA write is kept too, though durable: the earlier write it overwrote is sent again
    /// after a reconnection, and the FUA write after it, or the older bytes would come back.
    @Test func aFUAWriteIsSentAgainAfterTheWriteItOverwrote() {
        var machine = running()
        answer(&machine, data(8192, 1), at: 0, length: 8192)
        let fua = NBDClient.logged(.write([ByteBuffer(repeating: 2, count: 4096)], flags: .fua), at: 4096, length: 4096)
        answer(&machine, fua.operation, at: fua.offset, length: fua.length)
        let sent = machine.log.replay().entries.map { entry -> [UInt8] in
            guard case .write(let buffers, _) = entry.operation else { return [] }
            return buffers.flatMap { Array($0.readableBytesView) }
        }
        #expect(sent.count == 2 && sent.last == [UInt8](repeating: 2, count: 4096), "\(sent.map(\.count))")
    }

    @Test func nothingIsKeptWhereItCannotHelp() {
        var noDelay = Machine(configuration: .init(connections: 1, reconnectDelay: .zero, maximumAdmitted: 4))
        _ = noDelay.start(now: t0)
        _ = noDelay.dialSucceeded(slot: 0, connection: 100, identity: identity, canMultiConn: true, now: t0)
        answer(&noDelay, data(4096, 1), at: 0, length: 4096)
        #expect(noDelay.log.isEmpty)
        var noFlush = Machine(configuration: .init(connections: 1, reconnectDelay: .seconds(1), maximumAdmitted: 4))
        _ = noFlush.start(now: t0)
        var withoutFlush = identity
        withoutFlush.flags.remove(.sendFlush)
        _ = noFlush.dialSucceeded(slot: 0, connection: 100, identity: withoutFlush, canMultiConn: true, now: t0)
        answer(&noFlush, data(4096, 1), at: 0, length: 4096)
        #expect(noFlush.log.isEmpty)
    }

    /// With the window off, a client that never flushes keeps a bounded record.
    @Test func theRecordWithTheWindowOffIsBounded() {
        var log = ReplayLog(window: 0, maximumEntries: 16)
        for index in 0..<1000 { _ = log.answered(.trim, offset: UInt64(index) * 8192, length: 4096) }
        #expect(log.entries.count <= 16)
        var copy = log
        let doubt = copy.takeRangesInDoubt()
        // Every range written is in doubt, whatever was folded.
        for index in 0..<1000 {
            let range = UInt64(index) * 8192..<(UInt64(index) * 8192 + 4096)
            #expect(doubt.clamped(to: range) == [range], "range \(index)")
        }
        log.flushed(through: log.lastSequence)
        #expect(log.isEmpty)
    }
}
