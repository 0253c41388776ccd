import Foundation
@_spi(NBDMachines) import NBDCore
import NIOCore
import TestSupport

@testable import NBD

/// NBDClient's pool machine (``NBDClient/StateMachine``) run against a simulated server by a
/// seeded random schedule, with no sockets and no clock but its own: callers write, read and
/// flush; the server takes requests in any order and answers them in any order; connections
/// drop; the server restarts, losing what it had answered and not flushed, sometimes without
/// multi-conn; the export is resized; callers waiting for a connection give up. The harness does for the machine
/// what `NBDClient` does (a lost request is sent again, the replay log is sent, the log's own
/// flushes go out) and checks the promises against a model of the disk:
///
/// - a read returns what the writes answered before it put there;
/// - a write is answered only once the server holds it;
/// - a flush answered means the server's permanent storage holds every write answered before
///   it was made;
/// - the client ends only when the server stayed away for the whole reconnect delay;
/// - the run ends: every caller is answered, and nothing waits for ever.
///
/// To keep the model exact, the callers never have two requests out on overlapping bytes, no
/// write is out while a flush is, and nothing is out with a resize. The server's resizes are
/// durable at once.
struct PoolSimulation {
    typealias Machine = NBDClient.StateMachine<Int, Int>

    static let blockSize = 512
    static let size = blockSize * 32

    /// What a caller asked.
    enum Operation: CustomStringConvertible {
        case write(offset: Int, bytes: [UInt8])
        case read(offset: Int, length: Int)
        case flush
        case resize(Int)
        /// The log's own flush (`Action.flushLog`), which no caller waits for.
        case logFlush

        var range: Range<Int>? {
            switch self {
            case .write(let offset, let bytes): offset..<offset + bytes.count
            case .read(let offset, let length): offset..<offset + length
            case .flush, .logFlush, .resize: nil
            }
        }

        var description: String {
            switch self {
            case .write(let offset, let bytes): "write \(offset)+\(bytes.count)"
            case .read(let offset, let length): "read \(offset)+\(length)"
            case .flush: "flush"
            case .resize(let size): "resize to \(size)"
            case .logFlush: "log flush"
            }
        }
    }

    /// A request on a connection: a caller's, or the replay of the log.
    enum Sent {
        case caller(id: Int)
        case replay(Machine.Lease, [ReplayLog.Entry], through: Int)
    }

    struct Caller {
        var operation: Operation
        /// Its lease while it is out on a connection.
        var lease: Machine.Lease?
        /// The log's last answer when a flush was sent: what it covers.
        var covers = 0
        /// When it was first lost: a request lost is sent again within the reconnect delay.
        var firstLoss: ContinuousClock.Instant?
        /// Sent at least once: giving up now would leave the server's bytes unknown.
        var wasSent = false
    }

    struct Connection {
        var server: Int
        /// Sent, not yet taken by the server.
        var incoming: [Sent] = []
        /// Taken and done by the server, the answer not yet back, with a read's data (for a
        /// replay: empty, or nil when the server refused it).
        var answers: [(Sent, data: [UInt8]?)] = []
    }

    var random: SeededGenerator
    var machine: Machine
    let start = ContinuousClock.now
    var now: ContinuousClock.Instant
    static let reconnectDelay = Duration.seconds(10)

    // The server.
    var image = [UInt8](repeating: 0, count: PoolSimulation.size)
    var durable = [UInt8](repeating: 0, count: PoolSimulation.size)
    var serverEpoch = 0
    var serverUpAt: ContinuousClock.Instant?
    var multiConn = true

    // The model: what the answered writes put on the disk.
    var model = [UInt8](repeating: 0, count: PoolSimulation.size)

    var callers: [Int: Caller] = [:]
    var nextCaller = 0
    var connections: [Int: Connection] = [:]
    var nextConnection = 100
    var dials: [(slot: Int, secondary: Bool)] = []
    var timers: [ContinuousClock.Instant] = []
    var ended = false
    var issued = 0
    var failure: String?
    /// A request kept losing its connection past the reconnect delay and failed, as it
    /// should: what its write did is unknown, so the run stops there.
    var cutShort = false
    var connectedOnce = false
    /// What happened, for a failure's message: kept only when `tracing` (a failing seed is
    /// run again with it, the same way).
    let tracing: Bool
    private let lines = Lines()
    var trace: [String] { lines.all }

    /// The trace's lines: a reference, so that noting something is no mutation of the run.
    private final class Lines {
        var all: [String] = []
    }

    func note(_ text: @autoclosure () -> String) {
        if tracing { lines.all.append(text()) }
    }

    init(seed: UInt64, tracing: Bool = false) {
        self.tracing = tracing
        now = start
        random = SeededGenerator(seed: seed)
        let connections = Int.random(in: 1...4, using: &random)
        let window = [0, 1024, 4096, 1 << 20].randomElement(using: &random)!
        machine = Machine(
            configuration: .init(
                connections: connections,
                reconnectDelay: Self.reconnectDelay,
                maximumAdmitted: Int.random(in: 1...8, using: &random),
                replayWindow: max(window, 1),
                // The server may restart before the first connection: it is dialled again.
                openTimeout: Self.reconnectDelay
            )
        )
    }

    var identity: ExportIdentity {
        ExportIdentity(size: UInt64(durable.count), flags: [.hasFlags, .sendFlush, .canMultiConn], format: .extended, metaContexts: [])
    }

    // MARK: The run

    /// Runs the schedule: `requests` caller requests, then a last flush. Returns what broke.
    mutating func run(requests: Int = 60) -> String? {
        perform(machine.start(now: now) ?? [])
        var steps = 0
        while failure == nil {
            steps += 1
            if steps > 20_000 { return "no end after 20000 steps: \(pending)" + tail }
            if ended || cutShort { break }
            if issued >= requests, callers.isEmpty {
                // Everything answered: a last flush must leave the whole model durable.
                if issued == requests {
                    issue(.flush)
                    continue
                }
                break
            }
            step(requests: requests)
        }
        if let failure { return failure + tail }
        if cutShort { return nil }
        if !callers.filter({ if case .logFlush = $0.value.operation { false } else { true } }).isEmpty {
            return "callers never answered: \(pending)" + tail
        }
        return nil
    }

    var pending: String { callers.sorted { $0.key < $1.key }.map { "\($0.key): \($0.value.operation)" }.joined(separator: ", ") }
    /// The end of the trace: `NBD_SIMULATION_TRACE` lines (80 by default).
    var tail: String {
        let lines = ProcessInfo.processInfo.environment["NBD_SIMULATION_TRACE"].flatMap { Int($0) } ?? 80
        return "\n" + trace.suffix(lines).joined(separator: "\n")
    }

    /// One random event among those possible now.
    mutating func step(requests: Int) {
        var choices: [(weight: Int, event: Event)] = []
        if issued < requests { choices.append((6, .issue)) }
        if connections.values.contains(where: { !$0.incoming.isEmpty }) { choices.append((8, .serve)) }
        if connections.values.contains(where: { !$0.answers.isEmpty }) { choices.append((8, .answer)) }
        if !dials.isEmpty { choices.append((4, .dial)) }
        if !connections.isEmpty { choices.append((1, .dropConnection)) }
        // A few restarts a run, each once the client is back: a server that keeps dying
        // before anyone reaches it is the reconnect delay's test, not the log's.
        if serverUpAt == nil, serverEpoch < 4, machine.connectedCount > 0 { choices.append((1, .restartServer)) }
        // Dials and requests take no time beside the delays: time passes when none is under
        // way (it jumps to the next timer, or to the server's return).
        let working = !dials.isEmpty || connections.values.contains { !$0.incoming.isEmpty || !$0.answers.isEmpty }
        if !working, !timers.isEmpty || serverUpAt != nil { choices.append((2, .passTime)) }
        if callers.values.contains(where: { $0.mayGiveUp }) { choices.append((1, .giveUp)) }
        guard !choices.isEmpty else {
            failure = "nothing can happen, and the run is not over: \(pending)"
            return
        }
        var pick = Int.random(in: 0..<choices.reduce(0) { $0 + $1.weight }, using: &random)
        for (weight, event) in choices {
            if pick < weight {
                happen(event)
                return
            }
            pick -= weight
        }
    }

    enum Event { case issue, serve, answer, dial, dropConnection, restartServer, passTime, giveUp }

    mutating func happen(_ event: Event) {
        switch event {
        case .issue: issueRandom()
        case .serve: serve()
        case .answer: answer()
        case .dial: resolveDial()
        case .dropConnection:
            let id = connections.keys.sorted().randomElement(using: &random)!
            note("connection \(id) drops")
            drop(id)
        case .restartServer: restartServer()
        case .passTime: passTime()
        case .giveUp:
            let waiting = callers.filter { $0.value.mayGiveUp }.keys.sorted()
            let id = waiting.randomElement(using: &random)!
            if machine.waiterCancelled(id: id) != nil {
                note("caller \(id) gives up waiting")
                callers[id] = nil
            }
        }
    }

    // MARK: Callers

    mutating func issueRandom() {
        let out = callers.values.filter(\.isCallers)
        guard !out.contains(where: { if case .resize = $0.operation { true } else { false } }) else { return }
        let busy = out.compactMap(\.operation.range)
        let writing = out.contains { if case .write = $0.operation { true } else { false } }
        let flushing = out.contains { if case .flush = $0.operation { true } else { false } }
        let offset = Int.random(in: 0..<model.count / Self.blockSize, using: &random) * Self.blockSize
        let length = min(Int.random(in: 1...4, using: &random) * Self.blockSize, model.count - offset)
        let range = offset..<offset + length
        let free = !busy.contains { $0.overlaps(range) }
        switch Int.random(in: 0..<20, using: &random) {
        case 0..<10 where free && !flushing:
            let byte = UInt8(truncatingIfNeeded: issued + 1)
            issue(.write(offset: offset, bytes: [UInt8](repeating: byte, count: length)))
        case 10..<16 where free:
            issue(.read(offset: offset, length: length))
        case 16..<19 where !writing:
            issue(.flush)
        case 19 where out.isEmpty:
            issue(.resize(Int.random(in: 8...48, using: &random) * Self.blockSize))
        default:
            return
        }
    }

    mutating func issue(_ operation: Operation) {
        let id = nextCaller
        nextCaller += 1
        if case .logFlush = operation {} else { issued += 1 }
        callers[id] = Caller(operation: operation)
        note("caller \(id): \(operation)")
        // As NBDClient.resize: reconnections meanwhile may find the export at the new size.
        if case .resize(let size) = operation { machine.resizeStarted(to: UInt64(size)) }
        lease(id)
    }

    /// As `NBDClient.lease`: a connection now, or a wait.
    mutating func lease(_ id: Int) {
        guard let caller = callers[id] else { return }
        switch machine.lease(id: id, waiter: id, weight: caller.weight, exclusive: caller.isResize) {
        case .use(let lease): send(id, on: lease)
        case .wait: break
        case .fail(let error): finish(id, failing: error)
        }
    }

    mutating func send(_ id: Int, on lease: Machine.Lease) {
        callers[id]?.lease = lease
        callers[id]?.wasSent = true
        if case .flush = callers[id]?.operation { callers[id]?.covers = machine.log.lastSequence }
        if case .logFlush = callers[id]?.operation { callers[id]?.covers = machine.log.lastSequence }
        guard connections[lease.connection] != nil else {
            // Leased on a connection that just went (the machine hears of it a moment later):
            // it fails at once, and goes again.
            lost(id)
            return
        }
        connections[lease.connection]?.incoming.append(.caller(id: id))
    }

    /// The caller's request had no answer, its connection gone: as NBDClient's
    /// `withConnection`, the lease goes back, the loss is reported, and the request is sent
    /// again, within the reconnect delay.
    mutating func lost(_ id: Int) {
        guard let caller = callers[id], let held = caller.lease else { return }
        let cause = NBDError(.connectionClosed, "reset", connectionUsable: false)
        callers[id]?.lease = nil
        perform(machine.released(held, weight: caller.weight))
        perform(machine.connectionLost(slot: held.slot, generation: held.generation, cause: cause, now: now))
        let first = caller.firstLoss ?? now
        callers[id]?.firstLoss = first
        guard now - first < Self.reconnectDelay, !ended else {
            finish(id, failing: cause)
            return
        }
        lease(id)
    }

    /// The caller's request failed (its connection gone for good, the client ended).
    mutating func finish(_ id: Int, failing error: NBDError) {
        guard let caller = callers.removeValue(forKey: id) else { return }
        note("caller \(id) fails: \(error.code)")
        if case .resize(let size) = caller.operation {
            machine.resizeEnded(to: UInt64(size))
            // Done or not: the server's size is what it is; the model follows it.
            if !ended { cutShort = true }
        }
        if case .logFlush = caller.operation { perform(machine.logFlushed(through: nil)) }
        // A write that failed may or may not have reached the disk: the model cannot say
        // what its bytes hold any more.
        if case .write = caller.operation, !ended { cutShort = true }
    }

    // MARK: The server

    /// The server takes one request off a connection and does it.
    mutating func serve() {
        let busy = connections.filter { !$0.value.incoming.isEmpty }.keys.sorted()
        let id = busy.randomElement(using: &random)!
        var connection = connections[id]!
        let sent = connection.incoming.remove(at: Int.random(in: 0..<connection.incoming.count, using: &random))
        var data: [UInt8]?
        switch sent {
        case .caller(let caller):
            switch callers[caller]?.operation {
            case .write(let offset, let bytes): image.replaceSubrange(offset..<offset + bytes.count, with: bytes)
            case .read(let offset, let length): data = Array(image[offset..<offset + length])
            case .flush, .logFlush: durable = image
            case .resize(let size):
                image = Array(image.prefix(size)) + [UInt8](repeating: 0, count: max(0, size - image.count))
                durable = Array(durable.prefix(size)) + [UInt8](repeating: 0, count: max(0, size - durable.count))
            case nil: break
            }
        case .replay(_, let entries, _):
            // One at a time, in order, then a flush: as NBDClient's replay. A write past the
            // end fails (EINVAL), and the rest is not done.
            var refused = false
            for entry in entries {
                guard case .write(let buffers, _) = entry.operation else { continue }
                let bytes = buffers.flatMap { Array($0.readableBytesView) }
                guard Int(entry.offset) + bytes.count <= image.count else {
                    refused = true
                    break
                }
                image.replaceSubrange(Int(entry.offset)..<Int(entry.offset) + bytes.count, with: bytes)
            }
            if !refused { durable = image }
            data = refused ? nil : []
        }
        connection.answers.append((sent, data))
        connections[id] = connection
    }

    /// One answer comes back, whichever.
    mutating func answer() {
        let ready = connections.filter { !$0.value.answers.isEmpty }.keys.sorted()
        let id = ready.randomElement(using: &random)!
        let index = Int.random(in: 0..<connections[id]!.answers.count, using: &random)
        let (sent, data) = connections[id]!.answers.remove(at: index)
        switch sent {
        case .replay(let lease, let entries, let through):
            note("replay of \(entries.count) answered on \(id)\(data == nil ? ": EINVAL" : "")")
            let refused = NBDError(.serverError, "write past the end", serverErrno: .EINVAL, connectionUsable: true)
            perform(machine.replayFinished(lease, through: through, error: data == nil ? refused : nil))
        case .caller(let callerID):
            guard let caller = callers.removeValue(forKey: callerID), let lease = caller.lease else { return }
            note("caller \(callerID) answered on \(id)")
            switch caller.operation {
            case .write(let offset, let bytes):
                let range = offset..<offset + bytes.count
                if Array(image[range]) != bytes { failure = "a write was answered that the server does not hold: \(caller.operation)" }
                model.replaceSubrange(range, with: bytes)
                let logged = (ReplayLog.Operation.write([ByteBuffer(bytes: bytes)], flags: []), UInt64(offset), UInt64(bytes.count))
                perform(machine.released(lease, weight: bytes.count, answered: logged))
            case .read(let offset, let length):
                if data != Array(model[offset..<offset + length]) {
                    failure = "\(caller.operation) returned what no answered write put there"
                }
                perform(machine.released(lease, weight: 0))
            case .flush:
                perform(machine.released(lease, weight: 0))
                if let doubt = machine.flushed(through: caller.covers) {
                    failure = "a flush with the replay window on found writes in doubt: \(doubt)"
                } else if durable != model {
                    failure = "a flush was answered with answered writes not durable"
                }
            case .logFlush:
                perform(machine.released(lease, weight: 0))
                perform(machine.logFlushed(through: caller.covers))
            case .resize(let size):
                model = Array(model.prefix(size)) + [UInt8](repeating: 0, count: max(0, size - model.count))
                _ = machine.exportResized(to: UInt64(size), through: lease.slot)
                perform(machine.released(lease, weight: 0))
                machine.resizeEnded(to: UInt64(size))
            }
        }
    }

    /// The server restarts: what it had not flushed is gone, every connection with it; it is
    /// away a while, and may come back without multi-conn.
    mutating func restartServer() {
        note("the server restarts")
        for id in connections.keys.sorted() { drop(id) }
        image = durable
        serverEpoch += 1
        serverUpAt = now + .milliseconds(Int.random(in: 0...3000, using: &random))
        if Bool.random(using: &random) { multiConn.toggle() }
    }

    // MARK: Connections

    mutating func resolveDial() {
        let (slot, _) = dials.remove(at: Int.random(in: 0..<dials.count, using: &random))
        guard serverUpAt == nil else {
            note("dial of slot \(slot) refused")
            let refused = NBDError(.connectFailed, "connection refused", connectionUsable: false)
            perform(machine.dialFailed(slot: slot, error: refused, now: now))
            return
        }
        let id = nextConnection
        nextConnection += 1
        connections[id] = Connection(server: serverEpoch)
        connectedOnce = true
        note("slot \(slot) connected as \(id)")
        perform(machine.dialSucceeded(slot: slot, connection: id, identity: identity, canMultiConn: multiConn, now: now))
    }

    /// A connection is gone: what was on it had no answer, and goes again as NBDClient's
    /// `withConnection` sends it again.
    mutating func drop(_ id: Int) {
        guard let connection = connections.removeValue(forKey: id) else { return }
        let cause = NBDError(.connectionClosed, "reset", connectionUsable: false)
        let sent = connection.incoming + connection.answers.map(\.0)
        for request in sent {
            switch request {
            case .replay(let lease, _, let through):
                perform(machine.connectionLost(slot: lease.slot, generation: lease.generation, cause: cause, now: now))
                perform(machine.replayFinished(lease, through: through, error: cause))
            case .caller(let callerID):
                lost(callerID)
            }
        }
        // A connection with nothing out is lost too: the machine hears it from its close.
        if let slot = machine.slots.firstIndex(where: { if case .up(id, _, _) = $0 { true } else { false } }),
            case .up(_, _, let generation) = machine.slots[slot]
        {
            perform(machine.connectionLost(slot: slot, generation: generation, cause: cause, now: now))
        }
    }

    mutating func passTime() {
        let next = [timers.min(), serverUpAt].compactMap { $0 }.min() ?? now + .milliseconds(100)
        now = max(now, next)
        if let up = serverUpAt, up <= now {
            serverUpAt = nil
            note("the server is up again")
        }
        let due = timers.filter { $0 <= now }
        timers.removeAll { $0 <= now }
        if !due.isEmpty { perform(machine.timerFired(now: now)) }
        note("time \(now - start), \(due.count) timers due")
    }

    // MARK: The machine's actions

    mutating func perform(_ actions: [Machine.Action]) {
        for action in actions {
            switch action {
            case .dial(let slot, let secondary): dials.append((slot, secondary))
            case .armTimer(let instant):
                timers.append(instant)
                note("timer at \(instant - start)")
            case .resume(let waiter, let lease):
                guard callers[waiter] != nil else {
                    failure = "a lease went to a caller that gave up"
                    return
                }
                send(waiter, on: lease)
            case .fail(let waiter, let error): finish(waiter, failing: error)
            case .close(let id):
                // Closed softly: what is out on it is answered first, as NBDExport.disconnect.
                if let connection = connections[id], connection.incoming.isEmpty, connection.answers.isEmpty { connections[id] = nil }
            case .emit(let event): note("event: \(event)")
            case .finish(let error):
                note("the client ends: \(error.map { "\($0)" } ?? "shut down")")
                ended = true
                // Ending is right only when the server was away past the delays: the reconnect
                // delay, or the open timeout before any connection was made.
                if let error {
                    let awayTooLong = error.message.contains("the server stayed away") || (!connectedOnce && error.code == .connectFailed)
                    if awayTooLong { cutShort = true } else { failure = "the client ended with the server there: \(error)" }
                }
                for id in callers.keys.sorted() { finish(id, failing: error ?? Machine.shutDown) }
            case .replay(let lease, let entries, let through):
                note("replay of \(entries.count) on \(lease.connection)")
                guard connections[lease.connection] != nil else {
                    // On a connection that just went: it fails at once, as NBDClient's would.
                    let cause = NBDError(.connectionClosed, "reset", connectionUsable: false)
                    perform(machine.connectionLost(slot: lease.slot, generation: lease.generation, cause: cause, now: now))
                    perform(machine.replayFinished(lease, through: through, error: cause))
                    continue
                }
                connections[lease.connection]?.incoming.append(.replay(lease, entries, through: through))
            case .flushLog: issue(.logFlush)
            }
        }
    }
}

extension PoolSimulation.Caller {
    /// A caller's request, not the log's own flush.
    var isCallers: Bool { if case .logFlush = operation { false } else { true } }
    /// Waiting for its first connection: its caller may stop waiting without leaving the
    /// server's bytes unknown.
    var mayGiveUp: Bool { isCallers && lease == nil && !wasSent }
    var isResize: Bool { if case .resize = operation { true } else { false } }
    /// Its share of a connection's load, as NBDClient weighs it: a write's data.
    var weight: Int { if case .write(_, let bytes) = operation { bytes.count } else { 0 } }
}
