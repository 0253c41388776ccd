import Foundation
@_spi(NBDMachines) import NBDCore
import NIOCore
@_spi(NBDMachines) import TestSupport

@testable import NBD

/// NBDClient's pool machine (``NBDClient/StateMachine``) run over the connection machines by a
/// seeded random schedule, with no sockets and no clock but its own. Each connection is a
/// client and a server connection machine back to back (TestSupport's `Pair`: bytes dripped
/// in random pieces, requests done in any order), every server machine doing its requests on
/// one simulated disk. Callers write (some with FUA), write zeroes, trim, read and flush, and
/// cancel reads on the wire; connections drop; the server restarts, losing what it had
/// answered and not flushed, sometimes without multi-conn; the export is resized; callers
/// waiting for a connection give up. The harness does for the machines what `NBDClient` does
/// (a lost request is sent again, the replay log is sent, the log's own flushes go out) and
/// checks the promises against a model of the disk:
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
        case write(offset: Int, bytes: [UInt8], fua: Bool)
        /// Write zeroes, or a trim: the simulated disk reads a trimmed range as zeroes.
        case zero(offset: Int, length: Int, trim: Bool)
        case read(offset: Int, length: Int)
        case flush
        case resize(Int)
        /// The log's own flush (`Action.flushLog`), which no caller waits for.
        case logFlush

        var range: Range<Int>? {
            switch self {
            case .write(let offset, let bytes, _): offset..<offset + bytes.count
            case .zero(let offset, let length, _), .read(let offset, let length): offset..<offset + length
            case .flush, .logFlush, .resize: nil
            }
        }

        var description: String {
            switch self {
            case .write(let offset, let bytes, let fua): "write \(offset)+\(bytes.count)\(fua ? " FUA" : "")"
            case .zero(let offset, let length, let trim): "\(trim ? "trim" : "write zeroes") \(offset)+\(length)"
            case .read(let offset, let length): "read \(offset)+\(length)"
            case .flush: "flush"
            case .resize(let size): "resize to \(size)"
            case .logFlush: "log flush"
            }
        }
    }

    /// A request on a connection: a caller's, or one of the replay's.
    enum Sent {
        case caller(id: Int)
        case replay
    }

    struct Caller {
        var operation: Operation
        /// Its lease while it is out on a connection.
        var lease: Machine.Lease?
        /// Its request on the connection's client machine while it is out.
        var request: Pair.Request?
        /// The log's last answer when a flush was sent: what it covers.
        var covers = 0
        /// When it was first lost: a request lost is sent again within the reconnect delay.
        var firstLoss: ContinuousClock.Instant?
        /// Sent at least once: giving up now would leave the server's bytes unknown.
        var wasSent = false
    }

    /// The log sent again on a connection, as NBDClient's `replay`: one entry at a time,
    /// then a flush.
    struct Replay {
        var lease: Machine.Lease
        var entries: [ReplayLog.Entry]
        var through: Int
        var flushSent = false
    }

    /// A connection: the client and server connection machines back to back, the server's
    /// doing its requests on the simulated disk.
    struct Connection {
        var pair: Pair
        /// What is out on it, by request.
        var out: [ObjectIdentifier: Sent] = [:]
        var replay: Replay?
        /// The pool closed it: it goes once nothing is out on it.
        var closing = false

        /// Bytes or requests still to move.
        var isWorking: Bool { !out.isEmpty || !pair.toServer.isEmpty || !pair.toClient.isEmpty || !pair.performing.isEmpty }
    }

    /// The server's disk, shared by the server machines of every connection to it.
    final class Disk {
        var image = [UInt8](repeating: 0, count: PoolSimulation.size)
        var durable = [UInt8](repeating: 0, count: PoolSimulation.size)
        /// A write was done that the disk does not hold once done: set by a broken disk only.
        var failure: String?

        /// Does one request, as a server's backend: FUA makes the bytes it wrote durable.
        func perform(_ request: RequestHeader, _ data: [ByteBuffer]) -> ServerReply {
            let range = Int(request.offset)..<Int(request.offset) + Int(request.length)
            switch request.type {
            case .read:
                return .data([.data(ByteBuffer(bytes: image[range]))])
            case .write:
                image.replaceSubrange(range, with: data.flatMap { Array($0.readableBytesView) })
            case .writeZeroes, .trim:
                image.replaceSubrange(range, with: [UInt8](repeating: 0, count: range.count))
            case .flush:
                durable = image
            case .resize:
                let size = Int(request.offset)
                image = Array(image.prefix(size)) + [UInt8](repeating: 0, count: max(0, size - image.count))
                durable = Array(durable.prefix(size)) + [UInt8](repeating: 0, count: max(0, size - durable.count))
            default:
                break
            }
            if request.flags.contains(.fua), request.type != .resize { durable.replaceSubrange(range, with: image[range]) }
            return .done
        }
    }

    var random: SeededGenerator
    var machine: Machine
    let start = ContinuousClock.now
    var now: ContinuousClock.Instant
    static let reconnectDelay = Duration.seconds(10)
    let connectionsWanted: Int
    /// The framing every connection negotiates: simple, structured or extended.
    let format: TransmissionFormat

    // The server.
    let disk = Disk()
    var serverEpoch = 0
    var drops = 0
    var serverUpAt: ContinuousClock.Instant?
    var multiConn = true
    /// Every connection the start asked for was up at once: the server may now come back
    /// without multi-conn (the start's connections must agree with one another).
    var started = false

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
        connectionsWanted = Int.random(in: 1...4, using: &random)
        format = [.simple, .structured, .extended].randomElement(using: &random)!
        let window = [0, 1024, 4096, 1 << 20].randomElement(using: &random)!
        machine = Machine(
            configuration: .init(
                connections: connectionsWanted,
                reconnectDelay: Self.reconnectDelay,
                maximumAdmitted: Int.random(in: 1...8, using: &random),
                replayWindow: max(window, 1),
                // The server may restart before the first connection: it is dialled again.
                openTimeout: Self.reconnectDelay
            )
        )
    }

    // MARK: The run

    /// Runs the schedule: `requests` caller requests, then a last flush. Returns what broke.
    mutating func run(requests: Int = 40) -> String? {
        perform(machine.start(now: now) ?? [])
        var steps = 0
        while failure == nil {
            steps += 1
            if steps > 50_000 { return "no end after 50000 steps: \(pending)" + tail }
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
            if failure == nil { failure = disk.failure }
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
        let working = connections.values.contains { $0.isWorking }
        if working { choices.append((16, .wire)) }
        if !dials.isEmpty { choices.append((4, .dial)) }
        // A few drops a run: a connection takes dozens of rounds to carry a replay, and one
        // that kept dropping would never let it end.
        if !connections.isEmpty, drops < 8 { choices.append((1, .dropConnection)) }
        // A few restarts a run, each once the client is back: a server that keeps dying
        // before anyone reaches it is the reconnect delay's test, not the log's.
        if serverUpAt == nil, serverEpoch < 4, machine.connectedCount > 0 { choices.append((1, .restartServer)) }
        // Dials and requests take no time beside the delays: time passes when none is under
        // way (it jumps to the next timer, or to the server's return).
        if !working, dials.isEmpty, !timers.isEmpty || serverUpAt != nil { choices.append((2, .passTime)) }
        if callers.values.contains(where: { $0.mayGiveUp }) { choices.append((1, .giveUp)) }
        if callers.values.contains(where: { $0.mayCancel }) { choices.append((1, .cancelRead)) }
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

    enum Event { case issue, wire, dial, dropConnection, restartServer, passTime, giveUp, cancelRead }

    mutating func happen(_ event: Event) {
        switch event {
        case .issue: issueRandom()
        case .wire:
            let id = connections.filter { $0.value.isWorking }.keys.sorted().randomElement(using: &random)!
            moveBytes(on: id)
        case .dial: resolveDial()
        case .dropConnection:
            let id = connections.keys.sorted().randomElement(using: &random)!
            note("connection \(id) drops")
            drops += 1
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
        case .cancelRead: cancelRead()
        }
    }

    // MARK: Callers

    mutating func issueRandom() {
        let out = callers.values.filter(\.isCallers)
        guard !out.contains(where: { if case .resize = $0.operation { true } else { false } }) else { return }
        let busy = out.compactMap(\.operation.range)
        let writing = out.contains { $0.writes }
        let flushing = out.contains { if case .flush = $0.operation { true } else { false } }
        let offset = Int.random(in: 0..<model.count / Self.blockSize, using: &random) * Self.blockSize
        let length = min(Int.random(in: 1...4, using: &random) * Self.blockSize, model.count - offset)
        let range = offset..<offset + length
        let free = !busy.contains { $0.overlaps(range) }
        switch Int.random(in: 0..<24, using: &random) {
        case 0..<10 where free && !flushing:
            let byte = UInt8(truncatingIfNeeded: issued + 1)
            let fua = Int.random(in: 0..<4, using: &random) == 0
            issue(.write(offset: offset, bytes: [UInt8](repeating: byte, count: length), fua: fua))
        case 10..<13 where free && !flushing:
            issue(.zero(offset: offset, length: length, trim: Bool.random(using: &random)))
        case 13..<19 where free:
            issue(.read(offset: offset, length: length))
        case 19..<23 where !writing:
            issue(.flush)
        case 23 where out.isEmpty:
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

    /// The caller's request goes to its connection's client machine.
    mutating func send(_ id: Int, on lease: Machine.Lease) {
        guard let operation = callers[id]?.operation else { return }
        callers[id]?.lease = lease
        callers[id]?.wasSent = true
        if case .flush = operation { callers[id]?.covers = machine.log.lastSequence }
        if case .logFlush = operation { callers[id]?.covers = machine.log.lastSequence }
        guard connections[lease.connection] != nil else {
            // Leased on a connection that just went (the machine hears of it a moment later):
            // it fails at once, and goes again.
            lost(id)
            return
        }
        let request: Pair.Request
        switch operation {
        case .write(let offset, let bytes, let fua):
            request = connections[lease.connection]!.pair.submit(
                .write,
                offset: UInt64(offset),
                length: UInt64(bytes.count),
                payload: ByteBuffer(bytes: bytes),
                flags: fua ? .fua : []
            )
        case .zero(let offset, let length, let trim):
            request = connections[lease.connection]!.pair.submit(
                trim ? .trim : .writeZeroes,
                offset: UInt64(offset),
                length: UInt64(length)
            )
        case .read(let offset, let length):
            request = connections[lease.connection]!.pair.submit(.read, offset: UInt64(offset), length: UInt64(length))
        case .flush, .logFlush:
            request = connections[lease.connection]!.pair.submit(.flush, offset: 0, length: 0)
        case .resize(let size):
            request = connections[lease.connection]!.pair.submit(.resize, offset: UInt64(size), length: 0)
        }
        callers[id]?.request = request
        connections[lease.connection]!.out[ObjectIdentifier(request)] = .caller(id: id)
    }

    /// The caller's request had no answer, its connection gone: as NBDClient's
    /// `withConnection`, the lease goes back, the loss is reported, and the request is sent
    /// again, within the reconnect delay.
    mutating func lost(_ id: Int) {
        guard let caller = callers[id], let held = caller.lease else { return }
        let cause = NBDError(.connectionClosed, "reset", connectionUsable: false)
        callers[id]?.lease = nil
        callers[id]?.request = nil
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
        if caller.writes, !ended { cutShort = true }
    }

    /// A caller stops waiting for a read on the wire: the client machine drains its answer
    /// when it comes, and the connection goes on.
    mutating func cancelRead() {
        let id = callers.filter { $0.value.mayCancel }.keys.sorted().randomElement(using: &random)!
        guard let caller = callers.removeValue(forKey: id), let lease = caller.lease, let request = caller.request else { return }
        note("caller \(id) cancels its read on \(lease.connection)")
        connections[lease.connection]?.out[ObjectIdentifier(request)] = nil
        connections[lease.connection]?.pair.client.requestCancelled(request)
        perform(machine.released(lease, weight: 0))
    }

    // MARK: The wire

    /// Some rounds of a connection's machines (each: actions, a piece of bytes each way,
    /// perhaps a request done by the server); then what the client machine answered.
    mutating func moveBytes(on id: Int) {
        let size = disk.image.count
        // A few rounds at a time: a request takes several (a piece of bytes each way a round),
        // and everything else (drops, restarts) would otherwise happen between most of them.
        for _ in 0..<Int.random(in: 1...8, using: &random) where connections[id]!.pair.step() {}
        if disk.image.count != size {
            // A resize done through this connection: the server tells its other connections,
            // as NBDServer does.
            for other in connections.keys where other != id {
                connections[other]!.pair.server.exportSizeChanged(to: UInt64(disk.image.count))
            }
        }
        if connections[id]!.pair.clientClosed || connections[id]!.pair.serverClosed, !connections[id]!.closing {
            failure = "connection \(id) closed by its machines with requests out"
            return
        }
        let completed = connections[id]!.pair.completed
        connections[id]!.pair.completed = []
        for request in completed {
            guard let sent = connections[id]?.out.removeValue(forKey: ObjectIdentifier(request)) else { continue }
            switch sent {
            case .caller(let callerID): answered(callerID, request, on: id)
            case .replay: replayAnswered(request, on: id)
            }
        }
        if let connection = connections[id], connection.closing, connection.out.isEmpty { connections[id] = nil }
    }

    /// A caller's request answered by the client machine.
    mutating func answered(_ callerID: Int, _ request: Pair.Request, on id: Int) {
        guard let caller = callers.removeValue(forKey: callerID), let lease = caller.lease else { return }
        note("caller \(callerID) answered on \(id)\(request.error.map { ": \($0)" } ?? "")")
        if let error = request.error {
            failure = "\(caller.operation) failed on a connection that is up: \(error)"
            return
        }
        switch caller.operation {
        case .write(let offset, let bytes, let fua):
            let range = offset..<offset + bytes.count
            if Array(disk.image[range]) != bytes { failure = "a write was answered that the server does not hold: \(caller.operation)" }
            if fua, Array(disk.durable[range]) != bytes { failure = "a FUA write was answered before it was durable" }
            model.replaceSubrange(range, with: bytes)
            // What NBDClient's write logs of it.
            let logged = NBDClient.logged(
                .write([ByteBuffer(bytes: bytes)], flags: fua ? .fua : []),
                at: UInt64(offset),
                length: UInt64(bytes.count)
            )
            perform(machine.released(lease, weight: bytes.count, answered: logged))
        case .zero(let offset, let length, let trim):
            model.replaceSubrange(offset..<offset + length, with: [UInt8](repeating: 0, count: length))
            let operation: ReplayLog.Operation = trim ? .trim : .writeZeroes(flags: [])
            perform(machine.released(lease, weight: 0, answered: (operation, UInt64(offset), UInt64(length))))
        case .read(let offset, let length):
            if Array(request.data.readableBytesView) != Array(model[offset..<offset + length]) {
                failure = "\(caller.operation) returned what no answered write put there"
            }
            perform(machine.released(lease, weight: 0))
        case .flush:
            perform(machine.released(lease, weight: 0))
            if let doubt = machine.flushed(through: caller.covers) {
                failure = "a flush with the replay window on found writes in doubt: \(doubt)"
            } else if disk.durable != model,
                let offset = (0..<min(disk.durable.count, model.count)).first(where: { disk.durable[$0] != model[$0] })
            {
                let (durable, image, wanted) = (disk.durable[offset], disk.image[offset], model[offset])
                failure =
                    "a flush was answered with answered writes not durable: at \(offset), "
                    + "\(durable) durable, \(image) written, \(wanted) answered"
            } else if disk.durable.count != model.count {
                failure = "a flush was answered with the disk at \(disk.durable.count) bytes, not \(model.count)"
            }
        case .logFlush:
            perform(machine.released(lease, weight: 0))
            perform(machine.logFlushed(through: caller.covers))
        case .resize(let size):
            model = Array(model.prefix(size)) + [UInt8](repeating: 0, count: max(0, size - model.count))
            // As NBDClient.resized: the other connections' client machines follow.
            for other in machine.exportResized(to: UInt64(size), through: lease.slot) {
                connections[other]?.pair.client.exportResizedElsewhere(to: UInt64(size))
            }
            perform(machine.released(lease, weight: 0))
            machine.resizeEnded(to: UInt64(size))
        }
    }

    /// The next request of a replay, or its flush, or its end.
    mutating func sendReplay(on id: Int) {
        guard var replay = connections[id]?.replay else { return }
        var request: Pair.Request?
        while request == nil, let entry = replay.entries.first {
            replay.entries.removeFirst()
            switch entry.operation {
            case .write(let buffers, let flags):
                var payload = ByteBuffer()
                for buffer in buffers { payload.writeImmutableBuffer(buffer) }
                request = connections[id]!.pair.submit(.write, offset: entry.offset, length: entry.length, payload: payload, flags: flags)
            case .writeZeroes(let flags):
                request = connections[id]!.pair.submit(.writeZeroes, offset: entry.offset, length: entry.length, flags: flags)
            case .trim:
                request = connections[id]!.pair.submit(.trim, offset: entry.offset, length: entry.length)
            case nil:
                break
            }
        }
        if request == nil, !replay.flushSent {
            replay.flushSent = true
            request = connections[id]!.pair.submit(.flush, offset: 0, length: 0)
        }
        connections[id]!.replay = replay
        guard let request else {
            connections[id]!.replay = nil
            note("replay answered on \(id)")
            perform(machine.replayFinished(replay.lease, through: replay.through, error: nil))
            return
        }
        connections[id]!.out[ObjectIdentifier(request)] = .replay
    }

    mutating func replayAnswered(_ request: Pair.Request, on id: Int) {
        guard let replay = connections[id]?.replay else { return }
        guard let error = request.error else {
            sendReplay(on: id)
            return
        }
        note("replay refused on \(id): \(error)")
        connections[id]!.replay = nil
        perform(machine.replayFinished(replay.lease, through: replay.through, error: error))
    }

    // MARK: The server

    /// The server restarts: what it had not flushed is gone, every connection with it; it is
    /// away a while, and may come back without multi-conn.
    mutating func restartServer() {
        note("the server restarts")
        for id in connections.keys.sorted() { drop(id) }
        disk.image = disk.durable
        serverEpoch += 1
        serverUpAt = now + .milliseconds(Int.random(in: 0...3000, using: &random))
        if started, Bool.random(using: &random) { multiConn.toggle() }
    }

    // MARK: Connections

    /// A dial reaches the server, or not: the client machine negotiates with a server
    /// machine of the disk's size and flags.
    mutating func resolveDial() {
        let (slot, _) = dials.remove(at: Int.random(in: 0..<dials.count, using: &random))
        guard serverUpAt == nil else {
            note("dial of slot \(slot) refused")
            let refused = NBDError(.connectFailed, "connection refused", connectionUsable: false)
            perform(machine.dialFailed(slot: slot, error: refused, now: now))
            return
        }
        var flags: TransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .sendResize]
        if multiConn { flags.insert(.canMultiConn) }
        let export = ServerNegotiationStateMachine.Export(
            name: "disk",
            size: UInt64(disk.image.count),
            flags: flags,
            blockSizes: BlockSizeConstraints(minimum: 1, preferred: 4096, maximum: 1 << 20)
        )
        var pair = Pair(seed: UInt64.random(in: 0...UInt64.max, using: &random), exports: [export])
        pair.performer = { [disk] request, data in disk.perform(request, data) }
        // Messages cut at every byte are the back-to-back tests' work; here, a quarter are.
        pair.dripsWhole = true
        let transmission: ClientTransmissionStart
        do {
            try pair.connect()
            switch format {
            case .extended: _ = try pair.option(.extendedHeaders)
            case .structured: _ = try pair.option(.structuredReply)
            case .simple: break
            }
            transmission = try pair.go("disk")
        } catch {
            failure = "the negotiation failed: \(error)"
            return
        }
        let id = nextConnection
        nextConnection += 1
        connections[id] = Connection(pair: pair)
        connectedOnce = true
        note("slot \(slot) connected as \(id)")
        let identity = ExportIdentity(
            size: transmission.info.size,
            flags: transmission.info.flags,
            format: transmission.format,
            metaContexts: []
        )
        perform(machine.dialSucceeded(slot: slot, connection: id, identity: identity, canMultiConn: multiConn, now: now))
        if machine.connectedCount == connectionsWanted { started = true }
    }

    /// A connection is gone: what was on it had no answer, and goes again as NBDClient's
    /// `withConnection` sends it again.
    mutating func drop(_ id: Int) {
        guard let connection = connections.removeValue(forKey: id) else { return }
        let cause = NBDError(.connectionClosed, "reset", connectionUsable: false)
        if let replay = connection.replay {
            perform(machine.connectionLost(slot: replay.lease.slot, generation: replay.lease.generation, cause: cause, now: now))
            perform(machine.replayFinished(replay.lease, through: replay.through, error: cause))
        }
        for case .caller(let callerID) in connection.out.values.sorted(by: { "\($0)" < "\($1)" }) { lost(callerID) }
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
                if connections[id]?.out.isEmpty ?? false { connections[id] = nil } else { connections[id]?.closing = true }
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
                connections[lease.connection]!.replay = Replay(lease: lease, entries: entries, through: through)
                sendReplay(on: lease.connection)
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
    /// A read on the wire, which its caller may stop waiting for.
    var mayCancel: Bool { if case .read = operation { request != nil } else { false } }
    var isResize: Bool { if case .resize = operation { true } else { false } }
    /// Changes the disk: a write, write zeroes or trim.
    var writes: Bool {
        switch operation {
        case .write, .zero: true
        case .read, .flush, .logFlush, .resize: false
        }
    }
    /// Its share of a connection's load, as NBDClient weighs it: a write's data.
    var weight: Int { if case .write(_, let bytes, _) = operation { bytes.count } else { 0 } }
}
