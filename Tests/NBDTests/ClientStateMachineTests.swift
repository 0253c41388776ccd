@_spi(NBDMachines) import NBDCore
import Testing

@testable import NBD

/// NBDClient's rules, as sequences of events and the actions they cause: connections are
/// plain numbers, waiters strings, and time is whatever the test says.
@Suite("NBDClient state machine")
struct ClientStateMachineTests {
    typealias Machine = NBDClient.StateMachine<Int, String>
    let t0 = ContinuousClock.now
    let identity = ExportIdentity(size: 1 << 20, flags: [.hasFlags, .canMultiConn], format: .extended, metaContexts: ["base:allocation"])

    func machine(connections: Int = 4, delay: Duration = .seconds(10), admitted: Int = 8) -> Machine {
        Machine(configuration: .init(connections: connections, reconnectDelay: delay, maximumAdmitted: admitted))
    }

    /// The machine up with `count` connections (numbered 100, 101, ...).
    func running(_ machine: inout Machine, connections count: Int) {
        _ = machine.start(now: t0)
        _ = machine.dialSucceeded(slot: 0, connection: 100, identity: identity, canMultiConn: true, now: t0)
        for slot in 1..<count {
            _ = machine.dialSucceeded(slot: slot, connection: 100 + slot, identity: identity, canMultiConn: true, now: t0)
        }
    }

    func dials(_ actions: [Machine.Action]) -> [Int] {
        actions.compactMap { if case .dial(let slot, _) = $0 { slot } else { nil } }
    }

    func events(_ actions: [Machine.Action]) -> [NBDClientEvent] {
        actions.compactMap { if case .emit(let event) = $0 { event } else { nil } }
    }

    func failures(_ actions: [Machine.Action]) -> [(String, NBDError)] {
        actions.compactMap { if case .fail(let waiter, let error) = $0 { (waiter, error) } else { nil } }
    }

    /// Whether the actions end the client, and with which error (nil: shut down).
    func finish(_ actions: [Machine.Action]) -> (ends: Bool, error: NBDError?) {
        for action in actions { if case .finish(let error) = action { return (true, error) } }
        return (false, nil)
    }

    @Test func multiConnOpensTheRestWithTheShortDeadline() {
        var machine = machine()
        #expect(dials(machine.start(now: t0)!) == [0])
        #expect(machine.start(now: t0) == nil)
        let actions = machine.dialSucceeded(slot: 0, connection: 100, identity: identity, canMultiConn: true, now: t0)
        #expect(events(actions) == [.connected(connection: 0)])
        #expect(actions.filter { if case .dial(_, true) = $0 { true } else { false } }.count == 3)
    }

    @Test func withoutMultiConnOneConnectionAndItSaysSo() {
        var machine = machine()
        _ = machine.start(now: t0)
        let actions = machine.dialSucceeded(slot: 0, connection: 100, identity: identity, canMultiConn: false, now: t0)
        #expect(dials(actions).isEmpty)
        #expect(
            events(actions) == [
                .connected(connection: 0),
                .fewerConnections(connected: 1, wanted: 4, reason: "the server does not set NBD_FLAG_CAN_MULTI_CONN"),
            ]
        )
    }

    /// qemu-nbd -e 2: two of four answer; the client goes on with two, and says so once.
    @Test func extraConnectionsThatFailAreDroppedOnce() {
        var machine = machine()
        _ = machine.start(now: t0)
        _ = machine.dialSucceeded(slot: 0, connection: 100, identity: identity, canMultiConn: true, now: t0)
        _ = machine.dialSucceeded(slot: 1, connection: 101, identity: identity, canMultiConn: true, now: t0)
        let timeout = NBDError(.timedOut, "no greeting within 2 s", connectionUsable: false)
        #expect(events(machine.dialFailed(slot: 2, error: timeout, now: t0)).isEmpty)
        #expect(
            events(machine.dialFailed(slot: 3, error: timeout, now: t0))
                == [.fewerConnections(connected: 2, wanted: 4, reason: "no greeting within 2 s")]
        )
        #expect(machine.connectedCount == 2)
    }

    @Test func anExtraConnectionThatFindsAnotherExportEndsTheClient() {
        var machine = machine()
        _ = machine.start(now: t0)
        _ = machine.dialSucceeded(slot: 0, connection: 100, identity: identity, canMultiConn: true, now: t0)
        var other = identity
        other.format = .structured
        let actions = machine.dialSucceeded(slot: 1, connection: 101, identity: other, canMultiConn: true, now: t0)
        #expect(finish(actions).error?.code == .exportChanged)
        #expect(actions.contains { if case .close(101) = $0 { true } else { false } })
        #expect(actions.contains { if case .close(100) = $0 { true } else { false } })
    }

    /// Requests go to the connection with the fewest bytes outstanding, not round-robin.
    @Test func requestsGoWhereTheLeastIsOutstanding() {
        var machine = machine(connections: 3, admitted: 100)
        running(&machine, connections: 3)
        func slot(_ result: Machine.LeaseResult) -> Int? { if case .use(let lease) = result { lease.slot } else { nil } }
        #expect(slot(machine.lease(id: 1, waiter: "a", weight: 1 << 20)) == 0)
        #expect(slot(machine.lease(id: 2, waiter: "b", weight: 4096)) == 1)
        #expect(slot(machine.lease(id: 3, waiter: "c", weight: 4096)) == 2)
        // 1 and 2 hold 4 KiB each, 0 holds 1 MiB: the next two go to 1 and 2.
        #expect(slot(machine.lease(id: 4, waiter: "d", weight: 4096)) == 1)
        #expect(slot(machine.lease(id: 5, waiter: "e", weight: 4096)) == 2)
        guard case .use(let big) = machine.lease(id: 6, waiter: "f", weight: 1 << 20) else {
            Issue.record("no lease")
            return
        }
        #expect(big.slot == 1)
    }

    /// The admission cap: callers beyond it wait, and get their turn in order as others finish.
    @Test func theCapMakesCallersWait() {
        var machine = machine(connections: 1, admitted: 2)
        running(&machine, connections: 1)
        guard case .use(let first) = machine.lease(id: 1, waiter: "a", weight: 10) else {
            Issue.record("no lease")
            return
        }
        guard case .use = machine.lease(id: 2, waiter: "b", weight: 10) else {
            Issue.record("no lease")
            return
        }
        guard case .wait = machine.lease(id: 3, waiter: "c", weight: 10) else {
            Issue.record("not waiting")
            return
        }
        guard case .wait = machine.lease(id: 4, waiter: "d", weight: 10) else {
            Issue.record("not waiting")
            return
        }
        #expect(machine.waiterCancelled(id: 4) == "d")
        let actions = machine.released(first, weight: 10)
        #expect(actions.count == 1)
        guard case .resume("c", _) = actions.first else {
            Issue.record("c not resumed")
            return
        }
    }

    /// A resize leases alone: it waits for every request out, requests after it wait for it,
    /// and its size is what reconnections must find; the other connections are named to learn it.
    @Test func aLeaseAloneWaitsForTheOthersAndHoldsBackTheRest() {
        var machine = machine(connections: 2, admitted: 8)
        running(&machine, connections: 2)
        guard case .use(let read) = machine.lease(id: 1, waiter: "read", weight: 10) else {
            Issue.record("no lease")
            return
        }
        guard case .wait = machine.lease(id: 2, waiter: "resize", weight: 0, exclusive: true) else {
            Issue.record("the resize did not wait for the read")
            return
        }
        #expect(machine.tryLease(weight: 10, onLoop: nil) == nil)
        guard case .wait = machine.lease(id: 3, waiter: "write", weight: 10) else {
            Issue.record("a request went ahead of the waiting resize")
            return
        }
        let afterRead = machine.released(read, weight: 10)
        guard afterRead.count == 1, case .resume("resize", let resize) = afterRead.first else {
            Issue.record("the resize was not resumed alone: \(afterRead)")
            return
        }
        #expect(machine.exportResized(to: 4 << 20, through: resize.slot) == [resize.slot == 0 ? 101 : 100])
        #expect(machine.identity?.size == 4 << 20)
        let afterResize = machine.released(resize, weight: 0)
        guard afterResize.count == 1, case .resume("write", _) = afterResize.first else {
            Issue.record("the write was not resumed after the resize: \(afterResize)")
            return
        }
    }

    /// A loss is dialled again at once, then after 100 ms, 200 ms, ... at most 2 s; requests
    /// wait meanwhile; the reconnect resumes them and says after how many tries.
    @Test func aLostConnectionIsDialledAgainWithBackoff() {
        var machine = machine(connections: 1, delay: .seconds(10))
        running(&machine, connections: 1)
        let cause = NBDError(.connectionClosed, "reset", connectionUsable: false)
        let lost = machine.connectionLost(slot: 0, generation: 1, cause: cause, now: t0)
        #expect(events(lost) == [.lost(connection: 0, cause: cause)])
        #expect(dials(lost) == [0])
        // The lost connection is let go of, so that its buffers do not pile up over restarts.
        #expect(lost.contains { if case .close(100) = $0 { true } else { false } })
        #expect(lost.contains { if case .armTimer(let at) = $0 { at == t0 + .seconds(10) } else { false } })
        // A second report of the same loss (the close watcher) changes nothing.
        #expect(machine.connectionLost(slot: 0, generation: 1, cause: cause, now: t0).isEmpty)
        guard case .wait = machine.lease(id: 1, waiter: "a", weight: 1) else {
            Issue.record("not waiting")
            return
        }
        let refused = NBDError(.connectFailed, "connection refused", connectionUsable: false)
        var now = t0
        var pauses: [Duration] = []
        for _ in 0..<7 {
            let actions = machine.dialFailed(slot: 0, error: refused, now: now)
            guard case .armTimer(let at)? = actions.last else {
                Issue.record("no backoff: \(actions)")
                return
            }
            pauses.append(at - now)
            now = at
            #expect(dials(machine.timerFired(now: now)) == [0])
        }
        #expect(
            pauses == [
                .milliseconds(100), .milliseconds(200), .milliseconds(400), .milliseconds(800), .milliseconds(1600), .seconds(2),
                .seconds(2),
            ]
        )
        let back = machine.dialSucceeded(slot: 0, connection: 200, identity: identity, canMultiConn: true, now: now + .seconds(1))
        #expect(events(back) == [.reconnected(connection: 0, tries: 8, after: now + .seconds(1) - t0)])
        guard case .resume("a", let lease)? = back.last else {
            Issue.record("a not resumed")
            return
        }
        #expect(lease.connection == 200 && lease.generation == 2)
    }

    /// A server that stays away: at the delay every waiter fails with one error that says how
    /// long it tried and why, and the client is done.
    @Test func aServerThatStaysAwayEndsTheClientAtTheDelay() {
        var machine = machine(connections: 1, delay: .seconds(3))
        running(&machine, connections: 1)
        _ = machine.connectionLost(slot: 0, generation: 1, cause: NBDError(.connectionClosed, "reset", connectionUsable: false), now: t0)
        _ = machine.lease(id: 1, waiter: "a", weight: 1)
        _ = machine.lease(id: 2, waiter: "b", weight: 1)
        let refused = NBDError(.connectFailed, "cannot connect to unix:/s: Connection refused", connectionUsable: false)
        _ = machine.dialFailed(slot: 0, error: refused, now: t0)
        #expect(machine.timerFired(now: t0 + .seconds(2)).allSatisfy { if case .fail = $0 { false } else { true } })
        let end = machine.timerFired(now: t0 + .seconds(3))
        #expect(failures(end).map(\.0) == ["a", "b"])
        let error = failures(end)[0].1
        #expect(error.code == .unavailable)
        #expect(error.message.hasPrefix("the server stayed away: reconnecting for 3 s (1 try) did not bring it back"))
        #expect(error.message.hasSuffix("last cause: cannot connect to unix:/s: Connection refused"))
        #expect(finish(end).error?.code == .unavailable)
        guard case .fail(let later) = machine.lease(id: 3, waiter: "c", weight: 1) else {
            Issue.record("not failed")
            return
        }
        #expect(later.code == .unavailable)
    }

    /// Without a reconnect delay a loss ends the client with its cause, at once.
    @Test func withoutADelayALossEndsTheClient() {
        var machine = machine(connections: 2, delay: .zero)
        running(&machine, connections: 2)
        _ = machine.lease(id: 1, waiter: "a", weight: 1)
        let cause = NBDError(.connectionClosed, "reset", connectionUsable: false)
        let actions = machine.connectionLost(slot: 1, generation: 1, cause: cause, now: t0)
        #expect(dials(actions).isEmpty)
        #expect(finish(actions).error?.message == "reset")
    }

    /// With other connections up, requests go on there; a connection that cannot be made again
    /// within the delay is given up, and the rest go on.
    @Test func otherConnectionsCarryOnWhileOneIsAway() {
        var machine = machine(connections: 2, delay: .seconds(1))
        running(&machine, connections: 2)
        _ = machine.connectionLost(slot: 1, generation: 1, cause: NBDError(.connectionClosed, "reset", connectionUsable: false), now: t0)
        guard case .use(let lease) = machine.lease(id: 1, waiter: "a", weight: 1) else {
            Issue.record("no lease")
            return
        }
        #expect(lease.slot == 0)
        let refused = NBDError(.connectFailed, "refused", connectionUsable: false)
        var now = t0
        var given: [NBDClientEvent] = []
        while given.isEmpty, now < t0 + .seconds(5) {
            let actions = machine.dialFailed(slot: 1, error: refused, now: now)
            given = events(actions)
            guard case .armTimer(let at)? = actions.last else { break }
            now = at
            _ = machine.timerFired(now: now)
        }
        #expect(given == [.fewerConnections(connected: 1, wanted: 2, reason: "connection 1 could not be made again within 1 s")])
        #expect(machine.connectedCount == 1)
    }

    /// After a restart the export must be the same: another size, or read-only now, or a lost
    /// context, ends the client and nothing more is sent.
    @Test(arguments: [
        (
            ExportIdentity(size: 1 << 19, flags: [.hasFlags, .canMultiConn], format: .extended, metaContexts: ["base:allocation"]),
            "524288 bytes"
        ),
        (ExportIdentity(size: 1 << 20, flags: [.hasFlags, .readOnly], format: .extended, metaContexts: ["base:allocation"]), "read-only"),
        (ExportIdentity(size: 1 << 20, flags: [.hasFlags], format: .structured, metaContexts: []), "base:allocation is missing"),
    ])
    func aChangedExportAfterARestartEndsTheClient(found: ExportIdentity, says: String) {
        var machine = machine(connections: 1)
        running(&machine, connections: 1)
        _ = machine.lease(id: 9, waiter: "waiting", weight: 1)
        _ = machine.connectionLost(slot: 0, generation: 1, cause: NBDError(.connectionClosed, "reset", connectionUsable: false), now: t0)
        guard case .wait = machine.lease(id: 1, waiter: "a", weight: 1) else {
            Issue.record("not waiting")
            return
        }
        let actions = machine.dialSucceeded(slot: 0, connection: 200, identity: found, canMultiConn: true, now: t0 + .seconds(1))
        let error = finish(actions).error
        #expect(error?.code == .exportChanged)
        #expect(error?.message.contains(says) == true, "\(error?.message ?? "")")
        #expect(failures(actions).map(\.0) == ["a"])
        #expect(actions.contains { if case .close(200) = $0 { true } else { false } })
        #expect(!actions.contains { if case .resume = $0 { true } else { false } })
    }

    /// A connection lost during a resize may come back to an export the server has resized
    /// already: that size is no change while the resize is under way, and one after it.
    @Test func aReconnectionDuringAResizeMayFindItsSize() {
        var machine = machine(connections: 1)
        running(&machine, connections: 1)
        machine.resizeStarted(to: 4 << 20)
        var found = identity
        found.size = 4 << 20
        _ = machine.connectionLost(slot: 0, generation: 1, cause: NBDError(.connectionClosed, "reset", connectionUsable: false), now: t0)
        #expect(!finish(machine.dialSucceeded(slot: 0, connection: 200, identity: found, canMultiConn: true, now: t0)).ends)
        _ = machine.exportResized(to: 4 << 20, through: 0)
        machine.resizeEnded(to: 4 << 20)
        _ = machine.connectionLost(slot: 0, generation: 2, cause: NBDError(.connectionClosed, "reset", connectionUsable: false), now: t0)
        let actions = machine.dialSucceeded(slot: 0, connection: 201, identity: identity, canMultiConn: true, now: t0)
        #expect(finish(actions).error?.code == .exportChanged)
    }

    /// A flags change alone (a restarted server with other options) is no change of export.
    @Test func aRestartMayChangeFlagsThatDoNotMatter() {
        var machine = machine(connections: 1)
        running(&machine, connections: 1)
        _ = machine.connectionLost(slot: 0, generation: 1, cause: NBDError(.connectionClosed, "reset", connectionUsable: false), now: t0)
        var found = identity
        found.flags = [.hasFlags, .sendFlush]
        found.format = .structured
        #expect(!finish(machine.dialSucceeded(slot: 0, connection: 200, identity: found, canMultiConn: false, now: t0)).ends)
        #expect(machine.connectedCount == 1)
    }

    /// Shutting down fails the waiters and closes every connection; the first connect failing
    /// ends the client with that connect's error.
    @Test func shutdownAndAFailedStart() {
        var machine = machine(connections: 2)
        running(&machine, connections: 2)
        let actions = machine.shutdown()
        #expect(actions.filter { if case .close = $0 { true } else { false } }.count == 2)
        #expect(finish(actions).ends && finish(actions).error == nil)
        var failing = self.machine()
        _ = failing.start(now: t0)
        _ = failing.lease(id: 1, waiter: "a", weight: 1)
        let refused = NBDError(.connectFailed, "refused", connectionUsable: false)
        let end = failing.dialFailed(slot: 0, error: refused, now: t0)
        #expect(failures(end).map(\.1.code) == [.connectFailed])
        #expect(finish(end).error?.code == .connectFailed)
    }
}

extension ClientStateMachineTests {
    /// A request from a task on a connection's thread stays on that connection while its load
    /// is within the slack of the least loaded; past it, the least loaded takes it.
    @Test func theCallersOwnConnectionWithinTheSlack() {
        var machine = Machine(
            configuration: .init(connections: 2, reconnectDelay: .seconds(1), maximumAdmitted: 100, loops: 2, preferenceSlack: 1000)
        )
        running(&machine, connections: 2)
        #expect(machine.tryLease(weight: 600, onLoop: 1)?.slot == 1)
        #expect(machine.tryLease(weight: 600, onLoop: 1)?.slot == 1)  // 600 ahead: within 1000
        #expect(machine.tryLease(weight: 600, onLoop: 1)?.slot == 0)  // 1200 ahead: too far
        #expect(machine.tryLease(weight: 1, onLoop: nil)?.slot == 0)
    }
}

extension ClientStateMachineTests {
    /// A server back without `NBD_FLAG_CAN_MULTI_CONN` gets one connection: the others are
    /// given up (their dials closed when they succeed), and an event says why.
    @Test func aServerBackWithoutMultiConnGetsOneConnection() {
        var machine = machine(connections: 3)
        running(&machine, connections: 3)
        let reset = NBDError(.connectionClosed, "reset", connectionUsable: false)
        for slot in 0..<3 { _ = machine.connectionLost(slot: slot, generation: 1, cause: reset, now: t0) }
        let back = machine.dialSucceeded(slot: 1, connection: 201, identity: identity, canMultiConn: false, now: t0 + .seconds(1))
        #expect(
            events(back).contains(
                .fewerConnections(connected: 1, wanted: 3, reason: "the server no longer sets NBD_FLAG_CAN_MULTI_CONN")
            ),
            "\(back)"
        )
        #expect(machine.connectedCount == 1)
        // The other dials were under way: their connections are closed, not used.
        let late = machine.dialSucceeded(slot: 0, connection: 200, identity: identity, canMultiConn: false, now: t0 + .seconds(1))
        #expect(late.count == 1 && { if case .close(200) = late[0] { true } else { false } }(), "\(late)")
        #expect(machine.connectedCount == 1)
        guard case .use(let lease) = machine.lease(id: 1, waiter: "a", weight: 1) else {
            Issue.record("no lease")
            return
        }
        #expect(lease.connection == 201)
    }

    /// A server back without the export ends the client at once with `exportChanged`, not
    /// after the whole delay.
    @Test func anExportGoneAfterARestartEndsTheClientAtOnce() {
        var machine = machine(connections: 1, delay: .seconds(60))
        running(&machine, connections: 1)
        _ = machine.connectionLost(slot: 0, generation: 1, cause: NBDError(.connectionClosed, "reset", connectionUsable: false), now: t0)
        let unknown = NBDError(.optionRejected, "the server has no default export", optionReply: .errUnknown, connectionUsable: true)
        let actions = machine.dialFailed(slot: 0, error: unknown, now: t0 + .seconds(1))
        #expect(finish(actions).ends && finish(actions).error?.code == .exportChanged, "\(actions)")
        #expect(finish(actions).error?.message.contains("the export is gone after the restart") == true)
    }
}
