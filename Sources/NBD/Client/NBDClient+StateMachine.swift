@_spi(NBDMachines) import NBDCore

extension NBDClient {
    /// The rules of an `NBDClient`'s connections, without sockets, tasks or clocks: which
    /// connection a request goes to, when a lost one is dialled again, how long requests wait
    /// for one, and when the client gives up. Every input is an event carrying the time; what
    /// it causes comes back as actions, in order, for ``NBDClient`` to perform.
    ///
    /// Generic over the connection and the waiter so that tests drive it with plain values.
    struct StateMachine<Connection, Waiter> {
        typealias Instant = ContinuousClock.Instant

        struct Configuration {
            /// Connections wanted when the server sets `NBD_FLAG_CAN_MULTI_CONN`.
            var connections: Int
            /// How long a lost connection is dialled again, and requests wait for one; zero
            /// turns reconnecting off.
            var reconnectDelay: Duration
            /// Requests admitted at once, on the wire or waiting for a connection; callers
            /// beyond it wait their turn.
            var maximumAdmitted: Int
            /// The first pause between two dials of a lost connection; it doubles each time.
            var firstBackoff = Duration.milliseconds(100)
            /// The longest pause between two dials.
            var longestBackoff = Duration.seconds(2)
            /// Event loops the connections run on: connection i on loop i modulo this.
            var loops = 1
            /// How many bytes more than the least loaded connection the caller's own may have
            /// outstanding and still be chosen: a request from a task on a connection's thread
            /// stays there (no thread hop), as long as that keeps the load even within this.
            var preferenceSlack = 1 << 20
            /// Bytes of write data answered and not yet flushed that are kept to send again
            /// after a reconnection (see ``ReplayLog``); zero keeps only where they went.
            var replayWindow = 64 << 20
            /// How long the first connection is dialled again while the server is not up yet
            /// (qemu's `open-timeout`); zero: once.
            var openTimeout = Duration.zero
        }

        enum Slot {
            /// Not in use: the server allows fewer connections, or this one was given up.
            case unused
            /// Being dialled: `attempt` 0 is the first connect, then each dial after a loss.
            case dialing(attempt: Int)
            /// Lost; dialled again at `until`.
            case backingOff(attempt: Int, until: Instant)
            /// Serving requests; `load` is the bytes of the requests it has outstanding, and
            /// `generation` tells this connection from the slot's earlier ones.
            case up(Connection, load: Int, generation: Int)
        }

        enum Action {
            /// Dial connection `slot`; a `secondary` one (beyond the first, at the start) gets
            /// the short negotiation deadline.
            case dial(slot: Int, secondary: Bool)
            /// Call ``timerFired(now:)`` at this time.
            case armTimer(at: Instant)
            case resume(Waiter, Lease)
            case fail(Waiter, NBDError)
            /// Disconnect it softly: requests in flight finish first.
            case close(Connection)
            case emit(NBDClientEvent)
            /// The client is done: shut down (nil) or given up with this error.
            case finish(NBDError?)
            /// Send these entries of the log again on the lease's connection, in order, then
            /// flush, and report with ``replayFinished(_:through:error:)``: nothing else is out.
            case replay(Lease, [ReplayLog.Entry], through: Int)
            /// The log is past its window: flush, and report with ``logFlushed(through:)``.
            case flushLog
        }

        typealias Lease = ConnectionLease<Connection>

        enum LeaseResult {
            case use(Lease)
            case wait
            case fail(NBDError)
        }

        private enum Phase {
            case idle
            case starting
            case running
            case ended(NBDError?)
        }

        let configuration: Configuration
        private var phase = Phase.idle
        private(set) var slots: [Slot]
        /// What the first connection found: every later one must find the same.
        private(set) var identity: ExportIdentity?
        /// When each slot was lost, while it is being dialled again.
        private var lostAt: [Instant?]
        private var generations: [Int]
        /// Since when no connection is up (after one was), and how many dials failed since.
        private var outage: (since: Instant, failedDials: Int)?
        /// When run() began: the first connection is dialled until ``Configuration/openTimeout``
        /// after it.
        private var startedAt: Instant?
        /// A graceful shutdown is under way: no request is taken, and once those out are done
        /// and the log is flushed, the client ends.
        private var draining = false
        private var lastCause: NBDError?
        /// Secondary connections of the start still dialling, and why one failed.
        private var startingSecondaries = 0
        private var secondaryFailure: String?
        private var waiters: [(id: Int, waiter: Waiter, weight: Int, exclusive: Bool)] = []
        private var admitted = 0
        /// A lease taken alone is out (a resize): nothing else is admitted until it is back.
        private var exclusiveHeld = false
        /// The sizes of the resizes under way: a reconnection meanwhile may find one of them.
        private var resizesUnderWay: [UInt64] = []
        /// Writes answered and not yet covered by a flush, kept while reconnecting is on and
        /// the export can flush.
        private(set) var log: ReplayLog
        private var replay = Replay.none
        /// A flush of the log's own is out.
        private var flushingLog = false
        /// With the window off: what reconnections may have lost, for the next flush to say.
        private var rangesInDoubt = ByteRanges()

        private enum Replay {
            case none
            /// After a reconnection: the log goes again before anything else, once nothing is out.
            case pending
            /// Sent again: this many requests, with this much data.
            case running(requests: Int, bytes: Int)
        }

        init(configuration: Configuration) {
            self.configuration = configuration
            let count = max(1, configuration.connections)
            slots = Array(repeating: .unused, count: count)
            lostAt = Array(repeating: nil, count: count)
            generations = Array(repeating: 0, count: count)
            log = ReplayLog(window: configuration.replayWindow)
        }

        /// Whether answers are logged: a lost connection is dialled again (else the client
        /// ends), and the export can flush (else nothing would ever leave the log; and a
        /// server without a flush promises nothing more after one).
        private var logging: Bool {
            configuration.reconnectDelay > .zero && identity?.flags.contains(.sendFlush) == true
        }

        /// Connections that are up.
        var connectedCount: Int { slots.count { if case .up = $0 { true } else { false } } }
        /// True while a lost connection is being dialled again.
        var isReconnecting: Bool { lostAt.contains { $0 != nil } }

        // MARK: Events

        /// `run()` started: dial the first connection. Nil when it had started already.
        mutating func start(now: Instant) -> [Action]? {
            guard case .idle = phase else { return nil }
            phase = .starting
            startedAt = now
            slots[0] = .dialing(attempt: 0)
            return [.dial(slot: 0, secondary: false)]
        }

        /// A dial succeeded: the connection negotiated `identity`.
        mutating func dialSucceeded(
            slot: Int,
            connection: Connection,
            identity found: ExportIdentity,
            canMultiConn: Bool,
            now: Instant
        ) -> [Action] {
            guard case .dialing(let attempt) = slots[slot] else { return [.close(connection)] }
            switch phase {
            case .idle, .ended:
                return [.close(connection)]
            case .starting:
                phase = .running
                identity = found
                var actions = bringUp(slot, connection, event: .connected(connection: slot))
                // "In the absence of this flag, clients SHOULD NOT multiplex their commands over
                // more than one connection to the export."
                if slots.count > 1 {
                    if canMultiConn {
                        startingSecondaries = slots.count - 1
                        for other in 1..<slots.count {
                            slots[other] = .dialing(attempt: 0)
                            actions.append(.dial(slot: other, secondary: true))
                        }
                    } else {
                        actions.append(
                            .emit(
                                .fewerConnections(
                                    connected: 1,
                                    wanted: slots.count,
                                    reason: "the server does not set NBD_FLAG_CAN_MULTI_CONN"
                                )
                            )
                        )
                    }
                }
                return actions + resumeWaiters()
            case .running:
                let first = identity!
                if attempt == 0 {
                    // Every connection of the start negotiates exactly what the first did.
                    if let difference = found.difference(from: first, strict: true) {
                        return end(
                            NBDError(.exportChanged, "connection \(slot) found another export: \(difference)", connectionUsable: false)
                        )
                            + [.close(connection)]
                    }
                    var actions = bringUp(slot, connection, event: .connected(connection: slot))
                    actions += secondaryResolved()
                    return actions + resumeWaiters()
                }
                // After a restart the export must be the same one; anything else could write the
                // rest of a job onto another disk.
                if let difference = reconnectionDifference(found, from: first) {
                    return end(NBDError(.exportChanged, "the export changed while reconnecting: \(difference)", connectionUsable: false))
                        + [.close(connection)]
                }
                // "In the absence of this flag, clients SHOULD NOT multiplex their commands over
                // more than one connection": a server back without it gets one.
                var fewer: [Action] = []
                if !canMultiConn, slots.count > 1 {
                    if connectedCount > 0 { return [.close(connection)] + giveUp(slot, reason: Self.multiConnWithdrawn) }
                    for other in slots.indices where other != slot {
                        slots[other] = .unused
                        lostAt[other] = nil
                    }
                    fewer = [.emit(.fewerConnections(connected: 1, wanted: slots.count, reason: Self.multiConnWithdrawn))]
                }
                // Back at the smaller size of a resize under way (done, its answer lost): what
                // was answered past that end went with it, and is not sent again.
                if found.size < first.size { log.clip(to: found.size) }
                let since = lostAt[slot] ?? now
                lostAt[slot] = nil
                if outage != nil { outage = nil }
                let event = NBDClientEvent.reconnected(connection: slot, tries: attempt, after: now - since)
                // The server may have restarted and lost what it answered and never flushed.
                // A replay under way already sends it to the server this connection reaches.
                if !log.isEmpty, case .none = replay {
                    if log.window > 0 {
                        replay = .pending
                    } else {
                        rangesInDoubt.formUnion(log.takeRangesInDoubt())
                    }
                }
                return bringUp(slot, connection, event: event) + fewer + resumeWaiters()
            }
        }

        /// A dial failed with `error`.
        mutating func dialFailed(slot: Int, error: NBDError, now: Instant) -> [Action] {
            guard case .dialing(let attempt) = slots[slot] else { return [] }
            switch phase {
            case .idle, .ended:
                slots[slot] = .unused
                return []
            case .starting:
                // qemu's open-timeout: the first connection may wait for a server that is not
                // up yet. One that answered and refused (an option, TLS) is not asked again.
                let deadline = (startedAt ?? now) + configuration.openTimeout
                guard now < deadline, !draining, [.connectFailed, .connectionClosed, .timedOut].contains(error.code) else {
                    slots[slot] = .unused
                    return end(error)
                }
                return backOff(slot, attempt: attempt + 1, now: now, deadline: deadline)
            case .running:
                lastCause = error
                if attempt > 0, error.optionReply == .errUnknown {
                    // The server is back, without the export: no dial will bring it back.
                    slots[slot] = .unused
                    return end(NBDError(.exportChanged, "the export is gone after the restart: \(error)", connectionUsable: false))
                }
                if attempt == 0 {
                    // A server may advertise multi-conn and still accept fewer clients: go on
                    // with those that connected.
                    slots[slot] = .unused
                    secondaryFailure = secondaryFailure ?? error.description
                    return secondaryResolved()
                }
                outage?.failedDials += 1
                let deadline = (lostAt[slot] ?? now) + configuration.reconnectDelay
                guard now < deadline else { return giveUp(slot) }
                return backOff(slot, attempt: attempt + 1, now: now, deadline: deadline)
            }
        }

        /// Slot `slot` waits before its dial number `attempt`: from 100 ms, doubling, at most
        /// 2 s between two dials; the last at the deadline.
        private mutating func backOff(_ slot: Int, attempt: Int, now: Instant, deadline: Instant) -> [Action] {
            let exponent = min(attempt - 2, 20)
            let pause = min(configuration.firstBackoff * (1 << max(0, exponent)), configuration.longestBackoff)
            let next = min(now + pause, deadline)
            slots[slot] = .backingOff(attempt: attempt, until: next)
            return [.armTimer(at: next)]
        }

        /// Connection `slot` of `generation` was lost (closed, reset, timed out, shut down).
        /// Reports of a connection already replaced are ignored.
        mutating func connectionLost(slot: Int, generation: Int, cause: NBDError, now: Instant) -> [Action] {
            guard case .running = phase, case .up(let connection, _, generation) = slots[slot] else { return [] }
            lastCause = cause
            // Closed (if it is not yet) and let go: a lost connection holds its buffers.
            let lost: [Action] = [.emit(.lost(connection: slot, cause: cause)), .close(connection)]
            guard configuration.reconnectDelay > .zero else {
                slots[slot] = .unused
                return lost + end(cause)
            }
            slots[slot] = .dialing(attempt: 1)
            lostAt[slot] = now
            var actions = lost + [.dial(slot: slot, secondary: false)]
            if connectedCount == 0, outage == nil {
                outage = (now, 0)
                actions.append(.armTimer(at: now + configuration.reconnectDelay))
            }
            return actions
        }

        /// A request of `weight` bytes wants a connection: the one with the fewest bytes
        /// outstanding (one on the caller's event loop `onLoop` if it is within the slack of
        /// that), or a turn once one is up and the admission cap allows.
        mutating func lease(id: Int, waiter: Waiter, weight: Int, onLoop: Int? = nil, exclusive: Bool = false) -> LeaseResult {
            if case .ended(let error) = phase { return .fail(error ?? Self.shutDown) }
            if draining { return .fail(Self.shuttingDown) }
            if mayAdmit(exclusive: exclusive, waiting: !waiters.isEmpty && exclusive), let lease = leastLoaded(onLoop: onLoop) {
                take(lease, weight: weight, exclusive: exclusive)
                return .use(lease)
            }
            waiters.append((id, waiter, weight, exclusive))
            return .wait
        }

        /// ``lease(id:waiter:weight:onLoop:exclusive:)`` when a connection is free now and nobody waits
        /// before the caller; nil otherwise (the caller then waits with a waiter).
        mutating func tryLease(weight: Int, onLoop: Int?) -> Lease? {
            guard case .running = phase, !draining, case .none = replay, waiters.isEmpty, mayAdmit(exclusive: false, waiting: false),
                let lease = leastLoaded(onLoop: onLoop)
            else { return nil }
            take(lease, weight: weight, exclusive: false)
            return lease
        }

        /// Whether a lease may be taken now: one alone once nothing else is out and nobody
        /// waits before it (`waiting`); any other under the cap, while none is alone and none
        /// waits to be.
        private func mayAdmit(exclusive: Bool, waiting: Bool) -> Bool {
            guard !exclusiveHeld, case .none = replay else { return false }
            if exclusive { return admitted == 0 && !waiting }
            return admitted < configuration.maximumAdmitted && !waiters.contains { $0.exclusive }
        }

        /// The caller of a waiting request stopped waiting: its waiter, to resume with the
        /// cancellation, or nil when it was resumed already.
        mutating func waiterCancelled(id: Int) -> Waiter? {
            guard let index = waiters.firstIndex(where: { $0.id == id }) else { return nil }
            return waiters.remove(at: index).waiter
        }

        /// A request finished with its lease (answered, failed or cancelled); `answered` is the
        /// write, write-zeroes or trim the server answered, for the log.
        mutating func released(
            _ lease: Lease,
            weight: Int,
            answered: (operation: ReplayLog.Operation, offset: UInt64, length: UInt64)? = nil
        ) -> [Action] {
            giveBack(lease, weight: weight)
            var actions: [Action] = []
            if let answered, logging, log.answered(answered.operation, offset: answered.offset, length: answered.length),
                !flushingLog
            {
                flushingLog = true
                actions.append(.flushLog)
            }
            return actions + resumeWaiters() + drained()
        }

        /// A flush was answered that was sent after answer `sequence` of the log: what came
        /// before is durable. Returns the ranges a reconnection put in doubt since the last
        /// flush (the window off), for the caller to fail with once.
        mutating func flushed(through sequence: Int) -> ByteRanges? {
            dropFlushed(through: sequence)
            guard !rangesInDoubt.ranges.isEmpty else { return nil }
            defer { rangesInDoubt = ByteRanges() }
            return rangesInDoubt
        }

        /// The log's own flush is done (answered through `sequence`, or failed: nil).
        mutating func logFlushed(through sequence: Int?) -> [Action] {
            flushingLog = false
            if let sequence { dropFlushed(through: sequence) }
            return drained()
        }

        /// What a flush covered leaves the log, unless a replay is due or under way: its flush
        /// may be answered only once the replay has begun (its lease given back first), and a
        /// replay that stops half-way may have sent an older entry over a newer one, so that
        /// every entry must go again. The replay's own flush drops them (found by the pool
        /// simulation).
        private mutating func dropFlushed(through sequence: Int) {
            guard case .none = replay else { return }
            log.flushed(through: sequence)
        }

        /// The replay of ``Action/replay(_:_:through:)`` is done: sent and flushed (error
        /// nil), or failed. A lost connection leaves it to go again on the next one; a server
        /// that refuses a write it had answered before ends the client, since what it holds
        /// is not what was answered.
        mutating func replayFinished(_ lease: Lease, through sequence: Int, error: NBDError?) -> [Action] {
            giveBack(lease, weight: 0)
            guard case .running(let requests, let bytes) = replay else { return [] }
            replay = .none
            guard let error else {
                log.flushed(through: sequence)
                // A replay of nothing is the flush of a graceful shutdown: nothing to tell.
                let told: [Action] = requests > 0 ? [.emit(.replayed(requests: requests, bytes: bytes))] : []
                return told + resumeWaiters() + drained()
            }
            guard error.connectionUsable, error.serverErrno != .ESHUTDOWN else {
                replay = .pending
                return resumeWaiters()
            }
            return end(
                NBDError(
                    .unavailable,
                    "the writes answered before the reconnection could not be sent again: \(error)",
                    connectionUsable: false,
                    underlying: error
                )
            )
        }

        /// A timer armed by ``Action/armTimer(at:)`` went off (perhaps early or late).
        mutating func timerFired(now: Instant) -> [Action] {
            switch phase {
            case .starting, .running: break
            case .idle, .ended: return []
            }
            if case .running = phase, let outage, connectedCount == 0, now >= outage.since + configuration.reconnectDelay {
                return end(giveUpError(failedDials: outage.failedDials))
            }
            var actions: [Action] = []
            for slot in slots.indices {
                guard case .backingOff(let attempt, let until) = slots[slot], until <= now else { continue }
                slots[slot] = .dialing(attempt: attempt)
                actions.append(.dial(slot: slot, secondary: false))
            }
            return actions
        }

        /// `run()` was cancelled: waiting requests fail, connections are closed softly.
        mutating func shutdown() -> [Action] {
            if case .ended = phase { return [] }
            return end(nil)
        }

        /// A graceful shutdown (swift-service-lifecycle's): no request is taken from now on
        /// and those waiting for a connection fail; those on the wire are answered, what the
        /// log holds is flushed (after a replay, if a connection is being made again), and
        /// then the client ends, closing its connections softly.
        mutating func drain() -> [Action] {
            switch phase {
            case .ended: return []
            case .idle, .starting: return end(nil)
            case .running: break
            }
            draining = true
            var actions: [Action] = []
            for entry in waiters { actions.append(.fail(entry.waiter, Self.shuttingDown)) }
            waiters = []
            return actions + drained()
        }

        /// While draining, once nothing else is out: what the log holds is flushed (a replay
        /// of nothing but the flush), then the client ends. With no connection up, the replay
        /// that follows the reconnection flushes it.
        private mutating func drained() -> [Action] {
            guard draining, case .running = phase, admitted == 0, !exclusiveHeld, !flushingLog, case .none = replay else { return [] }
            guard !log.isEmpty else { return end(nil) }
            guard let lease = leastLoaded() else { return [] }
            take(lease, weight: 0, exclusive: false)
            replay = .running(requests: 0, bytes: 0)
            return [.replay(lease, [], through: log.lastSequence)]
        }

        // MARK: Internals

        static var multiConnWithdrawn: String { "the server no longer sets NBD_FLAG_CAN_MULTI_CONN" }

        static var shutDown: NBDError {
            NBDError(.connectionClosed, "the NBD client was shut down", connectionUsable: false)
        }

        static var shuttingDown: NBDError {
            NBDError(.connectionClosed, "the NBD client is shutting down: it takes no more requests", connectionUsable: false)
        }

        private mutating func bringUp(_ slot: Int, _ connection: Connection, event: NBDClientEvent) -> [Action] {
            generations[slot] += 1
            slots[slot] = .up(connection, load: 0, generation: generations[slot])
            return [.emit(event)]
        }

        /// One secondary connection of the start is settled; once all are, say if some failed.
        private mutating func secondaryResolved() -> [Action] {
            startingSecondaries -= 1
            guard startingSecondaries == 0 else { return [] }
            defer { secondaryFailure = nil }
            let said = secondaryFailure.map { [Action.emit(.fewerConnections(connected: connectedCount, wanted: slots.count, reason: $0))] }
            return (said ?? []) + resumeWaiters()
        }

        /// A lost connection could not be made again within the delay: without it if others
        /// are up, else the client gives up.
        private mutating func giveUp(_ slot: Int, reason: String? = nil) -> [Action] {
            slots[slot] = .unused
            lostAt[slot] = nil
            let pending = slots.contains { if case .unused = $0 { false } else { true } }
            guard connectedCount == 0, !pending else {
                let reason = reason ?? "connection \(slot) could not be made again within \(configuration.reconnectDelay.secondsText)"
                return [.emit(.fewerConnections(connected: connectedCount, wanted: slots.count, reason: reason))]
            }
            return end(giveUpError(failedDials: outage?.failedDials ?? 1))
        }

        /// The server stayed away for the whole delay: how long, how often, and the last cause.
        private func giveUpError(failedDials: Int) -> NBDError {
            let cause = lastCause.map { ": last cause: \($0)" } ?? ""
            let tries = failedDials == 1 ? "1 try" : "\(failedDials) tries"
            let delay = configuration.reconnectDelay.secondsText
            return NBDError(
                .unavailable,
                "the server stayed away: reconnecting for \(delay) (\(tries)) did not bring it back\(cause)",
                connectionUsable: false
            )
        }

        private mutating func end(_ error: NBDError?) -> [Action] {
            phase = .ended(error)
            var actions: [Action] = []
            if let error { actions.append(.emit(.gaveUp(error))) }
            for entry in waiters { actions.append(.fail(entry.waiter, error ?? Self.shutDown)) }
            waiters = []
            for slot in slots.indices {
                if case .up(let connection, _, _) = slots[slot] { actions.append(.close(connection)) }
                slots[slot] = .unused
            }
            outage = nil
            return actions + [.finish(error)]
        }

        private func leastLoaded(onLoop: Int? = nil) -> Lease? {
            // Requests wait for the start's extra connections (bounded by their short deadline),
            // so that the work is spread from the first request.
            guard startingSecondaries == 0 else { return nil }
            var best: (lease: Lease, load: Int)?
            var own: (lease: Lease, load: Int)?
            for slot in slots.indices {
                guard case .up(let connection, let load, let generation) = slots[slot] else { continue }
                let lease = Lease(slot: slot, generation: generation, connection: connection)
                if best == nil || load < best!.load { best = (lease, load) }
                if slot % configuration.loops == onLoop, own == nil || load < own!.load { own = (lease, load) }
            }
            if let own, let best, own.load <= best.load + configuration.preferenceSlack { return own.lease }
            return best?.lease
        }

        private mutating func giveBack(_ lease: Lease, weight: Int) {
            admitted -= 1
            // Nothing else is out while a lease alone (or the replay) is: this is it.
            exclusiveHeld = false
            if case .up(let connection, let load, lease.generation) = slots[lease.slot] {
                slots[lease.slot] = .up(connection, load: load - weight, generation: lease.generation)
            }
        }

        private mutating func take(_ lease: Lease, weight: Int, exclusive: Bool) {
            admitted += 1
            exclusiveHeld = exclusive
            if case .up(let connection, let load, let generation) = slots[lease.slot] {
                slots[lease.slot] = .up(connection, load: load + weight, generation: generation)
            }
        }

        /// Whether the first waiter, not one alone, may be admitted.
        private var mayAdmitNext: Bool { !exclusiveHeld && admitted < configuration.maximumAdmitted }

        /// A resize to `size` starts: until ``resizeEnded(to:)``, a reconnection may find the
        /// export at that size (the server may have resized before the connection was lost).
        mutating func resizeStarted(to size: UInt64) {
            resizesUnderWay.append(size)
        }

        mutating func resizeEnded(to size: UInt64) {
            if let index = resizesUnderWay.firstIndex(of: size) { resizesUnderWay.remove(at: index) }
        }

        /// How a reconnection's export differs from `first`, or nil when it is the same one:
        /// at the size of a resize under way, it is.
        private func reconnectionDifference(_ found: ExportIdentity, from first: ExportIdentity) -> String? {
            guard let difference = found.difference(from: first, strict: false) else { return nil }
            for size in resizesUnderWay {
                var resized = first
                resized.size = size
                if found.difference(from: resized, strict: false) == nil { return nil }
            }
            return difference
        }

        /// The export was resized to `size` through one connection: reconnections must find
        /// that size from now on. Answers the other connections up, which must learn it too.
        mutating func exportResized(to size: UInt64, through slot: Int) -> [Connection] {
            identity?.size = size
            // Writes answered past a new, smaller end are gone with those bytes.
            log.clip(to: size)
            return slots.indices.compactMap { index in
                guard index != slot, case .up(let connection, _, _) = slots[index] else { return nil }
                return connection
            }
        }

        private mutating func resumeWaiters() -> [Action] {
            if case .pending = replay {
                // The log goes again once nothing is out, before anything else.
                guard admitted == 0, !exclusiveHeld, case .running = phase, let lease = leastLoaded() else { return [] }
                let (entries, through) = log.replay()
                take(lease, weight: 0, exclusive: false)
                replay = .running(requests: entries.count, bytes: entries.reduce(0) { $0 + $1.dataBytes })
                return [.replay(lease, entries, through: through)]
            }
            // Nothing goes with the replay.
            guard case .none = replay else { return [] }
            var actions: [Action] = []
            while let entry = waiters.first, entry.exclusive ? admitted == 0 && !exclusiveHeld : mayAdmitNext, let lease = leastLoaded() {
                waiters.removeFirst()
                take(lease, weight: entry.weight, exclusive: entry.exclusive)
                actions.append(.resume(entry.waiter, lease))
            }
            return actions
        }
    }
}

/// A connection handed to one request of an `NBDClient`; it goes back with
/// `StateMachine.released(_:weight:)`.
struct ConnectionLease<Connection> {
    var slot: Int
    var generation: Int
    var connection: Connection
}

/// What a connection negotiated that every other connection to the export must find too.
struct ExportIdentity: Equatable, Sendable {
    var size: UInt64
    var flags: TransmissionFlags
    var format: TransmissionFormat
    var metaContexts: Set<NBDMetaContext>

    /// What differs from `first`, in words, or nil. `strict` (connections of the start) asks
    /// for the same size, flags, framing and contexts; after a restart the size must be the
    /// same, a writable export must still be writable, and no context may be missing.
    func difference(from first: ExportIdentity, strict: Bool) -> String? {
        if size != first.size { return "\(size) bytes instead of \(first.size)" }
        if flags.contains(.readOnly), !first.flags.contains(.readOnly) { return "it is read-only now" }
        if let missing = first.metaContexts.subtracting(metaContexts).map(\.name).min() {
            return "the metadata context \(missing) is missing"
        }
        guard strict else { return nil }
        if format != first.format { return "\(format) framing instead of \(first.format)" }
        if flags != first.flags { return "flags \(flags) instead of \(first.flags)" }
        if metaContexts != first.metaContexts {
            return "metadata contexts \(metaContexts.map(\.name).sorted()) instead of \(first.metaContexts.map(\.name).sorted())"
        }
        return nil
    }
}

extension NBDClient.StateMachine: Sendable where Connection: Sendable, Waiter: Sendable {}
extension NBDClient.StateMachine.Slot: Sendable where Connection: Sendable {}
extension NBDClient.StateMachine.Configuration: Sendable {}
extension ConnectionLease: Sendable where Connection: Sendable {}
