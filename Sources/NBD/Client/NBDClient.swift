import Logging
@_spi(NBDMachines) import NBDCore
import NBDEventLoop
import NIOConcurrencyHelpers
import NIOCore
import ServiceLifecycle

/// One export over several connections, that rides out a server restart: the client to build
/// on. `Sendable`; use it from as many tasks as you like.
///
/// It opens ``Configuration-swift.struct/connections`` connections (4 by default, as nbdcopy)
/// when the server sets `NBD_FLAG_CAN_MULTI_CONN`, else one, and sends each request on the
/// connection with the fewest bytes outstanding. With a ``Configuration-swift.struct/reconnectDelay``,
/// a lost connection (closed, reset, timed out, `NBD_ESHUTDOWN`) is dialled again, and the
/// requests that had no reply are sent again, from the caller's own buffers: callers see no
/// error unless the server stays away longer than the delay. See <doc:ConnectionsAndRestarts>
/// for what that promises and what a crash can still lose.
///
/// ``run()`` owns the connections: run it in a task group (or a swift-service-lifecycle
/// `ServiceGroup`) and cancel it to disconnect. ``withClient(_:configuration:_:)-(NBDURI,_,_)`` does that
/// for a script:
///
/// ```swift
/// try await NBDClient.withClient(uri) { client in
///     let data = try await client.read(at: 0, length: 65536)
/// }
/// ```
///
/// Requests made before ``run()`` starts wait for it.
public final class NBDClient: Sendable {
    typealias Machine = StateMachine<NBDExport, CheckedContinuation<ConnectionLease<NBDExport>, any Error>>

    /// What the client was made with.
    public let configuration: Configuration
    /// What happens to the connections, in order: connected, lost, reconnected, replayed,
    /// gave up. Read it from one task; the newest 256 events are kept while nobody reads. It
    /// ends when ``run()`` returns.
    public let events: AsyncStream<NBDClientEvent>
    /// Where the server is, and the export.
    public let uri: NBDURI

    private let eventSink: AsyncStream<NBDClientEvent>.Continuation
    private let machine: NIOLockedValueBox<Machine>
    private let work: (stream: AsyncStream<Work>, continuation: AsyncStream<Work>.Continuation)
    private let requestIDs = NIOLockedValueBox(0)
    /// Connections made and not yet closed, so that ``run()`` ends them all.
    private let open = NIOLockedValueBox<[ObjectIdentifier: NBDExport]>([:])
    /// Requests sent again (see ``replays``).
    private let replayCount = NIOLockedValueBox(0)
    /// Connection i runs on event loop i (wrapping around); these run tasks there.
    private let executors: [EventLoopTaskExecutor]

    /// What ``run()`` does for the state machine.
    private enum Work {
        case dial(slot: Int, secondary: Bool)
        case timer(ContinuousClock.Instant)
        case close(NBDExport)
        case finish(NBDError?)
        case replay(Machine.Lease, [ReplayLog.Entry], through: Int)
        case flushLog
    }

    /// A client of the export `uri` names (its `tls-*` parameters apply, as in
    /// ``NBDConnection/connect(to:configuration:)-(NBDURI,_)``). Nothing is dialled before
    /// ``run()``.
    public init(_ uri: NBDURI, configuration: Configuration = Configuration()) {
        self.uri = uri
        self.configuration = configuration
        (events, eventSink) = AsyncStream.makeStream(of: NBDClientEvent.self, bufferingPolicy: .bufferingNewest(256))
        work = AsyncStream.makeStream(of: Work.self)
        let loops = Array(configuration.connection.eventLoopGroup.makeIterator())
        executors = loops.prefix(max(1, configuration.connections)).map { EventLoopTaskExecutor($0) }
        let executorCount = executors.count
        let admitted = max(1, configuration.connections) * max(1, configuration.connection.maximumRequestsInFlight)
        machine = NIOLockedValueBox(
            Machine(
                configuration: Machine.Configuration(
                    connections: configuration.connections,
                    reconnectDelay: configuration.reconnectDelay,
                    maximumAdmitted: admitted,
                    loops: executorCount,
                    replayWindow: configuration.replayWindow,
                    openTimeout: configuration.openTimeout
                )
            )
        )
    }

    /// A client of the export a URI names, as text.
    public convenience init(_ uri: String, configuration: Configuration = Configuration()) throws {
        self.init(try NBDURI(uri), configuration: configuration)
    }

    /// A client of `exportName` at `address`; TLS as `configuration.connection.tls` says.
    public convenience init(address: NBDAddress, exportName: String = "", configuration: Configuration = Configuration()) {
        let transport: NBDURI.Transport =
            switch address {
            case .tcp(let host, let port): .tcp(host: host, port: port)
            case .unix(let path): .unix(path: path)
            case .abstractUnix(let name): .abstractUnix(name: name)
            case .vsock(let cid, let port): .vsock(cid: cid, port: Int(port))
            }
        self.init(NBDURI(transport, exportName: exportName), configuration: configuration)
    }

    deinit {
        eventSink.finish()
        work.continuation.finish()
    }

    /// Requests sent again so far: those whose connection was lost before their reply, and
    /// the writes answered but not flushed that a reconnection sent again from the replay log.
    public var replays: Int { replayCount.withLockedValue { $0 } }

    // MARK: Running

    /// Opens the connections and keeps them: dials again what is lost, within the reconnect
    /// delay. Returns when the task running it is cancelled, once the requests in flight have
    /// finished and every connection is disconnected softly, or after a graceful shutdown of
    /// its `ServiceGroup` (requests refused from then on, those on the wire answered, the
    /// replay log flushed); throws the error that ended the client otherwise (the first
    /// connection could not be made within ``Configuration-swift.struct/openTimeout``, the
    /// server stayed away, the export changed). Call it once.
    public func run() async throws {
        guard let actions = machine.withLockedValue({ $0.start(now: .now) }) else {
            throw NBDError.invalidArgument("NBDClient.run() was called twice")
        }
        let failure = NIOLockedValueBox<NBDError?>(nil)
        // In a ServiceGroup, a graceful shutdown drains the client (see drain()); cancelling
        // the task ends it at once.
        await withGracefulShutdownHandler {
            await serve(actions, failure: failure)
        } onGracefulShutdown: {
            self.perform(self.machine.withLockedValue { $0.drain() })
        }
        perform(machine.withLockedValue { $0.shutdown() })
        for export in open.withLockedValue({ open in
            defer { open = [:] }
            return Array(open.values)
        }) {
            await export.disconnect()
        }
        // Nothing more happens to the connections: readers of the events see their end.
        eventSink.finish()
        if let error = failure.withLockedValue({ $0 }) { throw error }
    }

    /// The work of ``run()``: dials, timers, closes, replays, flushes, until the machine ends.
    private func serve(_ actions: [Machine.Action], failure: NIOLockedValueBox<NBDError?>) async {
        // Discarding: the many short tasks (dials, timers, disconnects) are freed as they end,
        // not kept until run() returns with what they captured (a lost connection's buffers).
        await withDiscardingTaskGroup { group in
            await withTaskCancellationHandler {
                perform(actions)
                loop: for await item in work.stream {
                    switch item {
                    case .dial(let slot, let secondary):
                        group.addTask { await self.dial(slot, secondary: secondary) }
                    case .timer(let instant):
                        group.addTask {
                            try? await Task.sleep(until: instant, clock: .continuous)
                            self.perform(self.machine.withLockedValue { $0.timerFired(now: ContinuousClock.now) })
                        }
                    case .close(let export):
                        open.withLockedValue { _ = $0.removeValue(forKey: ObjectIdentifier(export)) }
                        group.addTask { await export.disconnect() }
                    case .replay(let lease, let entries, let through):
                        group.addTask { await self.replay(entries, on: lease, through: through) }
                    case .flushLog:
                        group.addTask {
                            let covered = try? await self.flushCovering()
                            self.perform(self.machine.withLockedValue { $0.logFlushed(through: covered) })
                        }
                    case .finish(let error):
                        failure.withLockedValue { $0 = error }
                        break loop
                    }
                }
            } onCancel: {
                self.perform(self.machine.withLockedValue { $0.shutdown() })
            }
            // Timers and dials still under way are of no use now; disconnects finish anyway.
            group.cancelAll()
        }
    }

    /// Runs a client for the length of `body`: connects (throwing if the first connection
    /// cannot be made), calls `body`, then disconnects softly.
    public static func withClient<Result>(
        _ uri: NBDURI,
        configuration: Configuration = Configuration(),
        _ body: (NBDClient) async throws -> Result
    ) async throws -> Result {
        let client = NBDClient(uri, configuration: configuration)
        return try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await client.run() }
            do {
                _ = try await client.info
                let result = try await body(client)
                group.cancelAll()
                try? await group.waitForAll()
                return result
            } catch {
                group.cancelAll()
                try? await group.waitForAll()
                throw error
            }
        }
    }

    /// ``withClient(_:configuration:_:)-(NBDURI,_,_)`` with the URI as text.
    public static func withClient<Result>(
        _ uri: String,
        configuration: Configuration = Configuration(),
        _ body: (NBDClient) async throws -> Result
    ) async throws -> Result {
        try await withClient(try NBDURI(uri), configuration: configuration, body)
    }

    // MARK: What every connection shares

    /// The export's name, size, flags and block sizes, as the first connection negotiated
    /// them (every other must find the same). Waits for a connection.
    public var info: NBDExportInfo {
        get async throws { try await withConnection(weight: 0) { $0.info } }
    }

    /// The export's size in bytes. Waits for a connection.
    public var size: UInt64 {
        get async throws { try await info.size }
    }

    /// The metadata contexts negotiated. Waits for a connection.
    public var metaContexts: [NBDMetaContext] {
        get async throws { try await withConnection(weight: 0) { $0.metaContexts } }
    }

    /// Connections up now.
    public var connectionCount: Int { machine.withLockedValue { $0.connectedCount } }

    /// True while a lost connection is being dialled again, within the reconnect delay:
    /// requests meanwhile wait (or go to the connections still up).
    public var isReconnecting: Bool { machine.withLockedValue { $0.isReconnecting } }

    /// The TLS version of the connections (for example `tlsv13`), or nil in clear. Waits for
    /// a connection.
    public var tlsVersion: String? {
        get async throws { try await withConnection(weight: 0) { $0.tlsVersion } }
    }

    /// The thread that runs connection `index` (counting from 0, wrapping around), as a task
    /// executor: tasks that issue many requests lose less to thread hops there, as with
    /// ``NBDExport/taskExecutor``. A request still goes to the connection with the fewest bytes
    /// outstanding, which is most often that one when every task keeps to its own.
    public func taskExecutor(for index: Int) -> any TaskExecutor {
        executors[index % executors.count]
    }

    // MARK: Internals

    /// Runs `body` on a connection leased for a request of `weight` bytes. When the connection
    /// is lost before the reply, and reconnecting is on, `body` runs again on a live one.
    /// With `alone`, no other request is out while `body` runs (a resize: see
    /// ``resize(to:)``).
    /// A write, write-zeroes or trim names itself in `logs`: once answered, it is kept in the
    /// replay log until a flush covers it.
    nonisolated(nonsending) func withConnection<T>(
        weight: Int,
        alone: Bool = false,
        logs answer: (operation: ReplayLog.Operation, offset: UInt64, length: UInt64)? = nil,
        _ body: nonisolated(nonsending) (NBDExport, _ slot: Int) async throws -> T
    ) async throws -> T {
        var firstLoss: ContinuousClock.Instant?
        while true {
            let lease = try await self.lease(weight: weight, alone: alone)
            let result: Result<T, any Error>
            do {
                result = .success(try await body(lease.connection, lease.slot))
            } catch {
                result = .failure(error)
            }
            let answered = if case .success = result { answer } else { nil as (ReplayLog.Operation, UInt64, UInt64)? }
            perform(machine.withLockedValue { $0.released(lease, weight: weight, answered: answered) })
            guard case .failure(let error) = result, let cause = Self.lostConnection(error) else { return try result.get() }
            // The request had no reply: its connection is gone.
            let now = ContinuousClock.now
            perform(machine.withLockedValue { $0.connectionLost(slot: lease.slot, generation: lease.generation, cause: cause, now: now) })
            guard configuration.reconnectDelay > .zero else { throw error }
            if firstLoss == nil { firstLoss = now }
            guard now - firstLoss! < configuration.reconnectDelay else { throw error }
            replayCount.withLockedValue { $0 += 1 }
        }
    }

    /// Runs `body`, a resize to `size`: reconnections meanwhile may find the export at that size.
    func resizing(to size: UInt64, _ body: () async throws -> Void) async throws {
        machine.withLockedValue { $0.resizeStarted(to: size) }
        defer { machine.withLockedValue { $0.resizeEnded(to: size) } }
        try await body()
    }

    /// Connection `slot` resized the export: the others, and reconnections, follow.
    func resized(to size: UInt64, through slot: Int) async {
        let others = machine.withLockedValue { $0.exportResized(to: size, through: slot) }
        for other in others { await other.exportResizedElsewhere(to: size) }
    }

    /// ``withConnection(weight:alone:logs:_:)`` for a body that needs only the connection.
    nonisolated(nonsending) func withConnection<T>(
        weight: Int,
        logs answer: (operation: ReplayLog.Operation, offset: UInt64, length: UInt64)? = nil,
        _ body: nonisolated(nonsending) (NBDExport) async throws -> T
    ) async throws -> T {
        try await withConnection(weight: weight, alone: false, logs: answer) { export, _ in try await body(export) }
    }

    /// Flushes, and answers the last answer of the log the flush covers: those answered
    /// before it was sent.
    nonisolated(nonsending) func flushCovering() async throws -> Int {
        try await withConnection(weight: 0) { export in
            let sequence = machine.withLockedValue { $0.log.lastSequence }
            try await export.flush()
            return sequence
        }
    }

    /// A flush covered the log through `sequence`: the ranges a reconnection put in doubt
    /// meanwhile, with the replay window off, once.
    func flushed(through sequence: Int) -> ByteRanges? {
        machine.withLockedValue { $0.flushed(through: sequence) }
    }

    /// Sends `entries` of the log again on the lease's connection, in the order they were
    /// answered (one at a time: a later one may overwrite an earlier one), then flushes.
    private func replay(_ entries: [ReplayLog.Entry], on lease: Machine.Lease, through sequence: Int) async {
        let export = lease.connection
        var failure: NBDError?
        do {
            for entry in entries {
                switch entry.operation {
                case .write(let data, let flags): try await export.write(segments: data, at: entry.offset, flags: flags)
                case .writeZeroes(let flags): try await export.writeZeroes(at: entry.offset, length: entry.length, flags: flags)
                case .trim: try await export.trim(at: entry.offset, length: entry.length)
                case nil: break
                }
            }
            try await export.flush()
            replayCount.withLockedValue { $0 += entries.count }
        } catch {
            failure =
                error as? NBDError ?? NBDError(.connectionClosed, "the replay was stopped", connectionUsable: false, underlying: error)
        }
        if let failure, let cause = Self.lostConnection(failure) {
            let now = ContinuousClock.now
            perform(machine.withLockedValue { $0.connectionLost(slot: lease.slot, generation: lease.generation, cause: cause, now: now) })
        }
        perform(machine.withLockedValue { $0.replayFinished(lease, through: sequence, error: failure) })
    }

    /// The error, when it means the connection is gone: closed, reset, timed out, shut down
    /// by the server, or broken by a violation.
    private static func lostConnection(_ error: any Error) -> NBDError? {
        guard let error = error as? NBDError else { return nil }
        return !error.connectionUsable || error.serverErrno == .ESHUTDOWN ? error : nil
    }

    nonisolated(nonsending) private func lease(weight: Int, alone: Bool) async throws -> Machine.Lease {
        // The caller's thread, when it is a connection's: its requests stay there if the load allows.
        let onLoop = executors.firstIndex { $0.eventLoop.inEventLoop }
        // Most requests find a connection free: no continuation, no cancellation handler.
        if !alone, let lease = machine.withLockedValue({ $0.tryLease(weight: weight, onLoop: onLoop) }) { return lease }
        let id = requestIDs.withLockedValue { id in
            id += 1
            return id
        }
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<ConnectionLease<NBDExport>, any Error>) in
                switch machine.withLockedValue({ $0.lease(id: id, waiter: continuation, weight: weight, onLoop: onLoop, exclusive: alone) })
                {
                case .use(let lease): continuation.resume(returning: lease)
                case .fail(let error): continuation.resume(throwing: error)
                case .wait:
                    // Cancelled before the handler below could find the waiter.
                    if Task.isCancelled, let waiter = machine.withLockedValue({ $0.waiterCancelled(id: id) }) {
                        waiter.resume(throwing: CancellationError())
                    }
                }
            }
        } onCancel: {
            machine.withLockedValue { $0.waiterCancelled(id: id) }?.resume(throwing: CancellationError())
        }
    }

    private func dial(_ slot: Int, secondary: Bool) async {
        var connection = configuration.connection
        // Connection i runs on event loop i, so that the connections share the work.
        let loops = Array(connection.eventLoopGroup.makeIterator())
        connection.eventLoopGroup = loops[slot % loops.count]
        if secondary {
            let limit = configuration.additionalConnectionTimeout
            connection.connectTimeout = min(connection.connectTimeout, limit)
            connection.negotiationTimeout = min(connection.negotiationTimeout, limit)
        }
        let actions: [Machine.Action]
        do {
            let export = try await NBDExport.connect(to: uri, configuration: connection)
            open.withLockedValue { $0[ObjectIdentifier(export)] = export }
            let identity = ExportIdentity(
                size: export.size,
                flags: export.info.flags,
                format: export.transmissionFormat,
                metaContexts: Set(export.metaContexts)
            )
            let (succeeded, generation) = machine.withLockedValue { machine in
                let actions = machine.dialSucceeded(
                    slot: slot,
                    connection: export,
                    identity: identity,
                    canMultiConn: export.info.canMultiConn,
                    now: ContinuousClock.now
                )
                guard case .up(_, _, let generation) = machine.slots[slot] else { return (actions, nil as Int?) }
                return (actions, generation)
            }
            actions = succeeded
            // Outside the lock: a connection closed already reports at once.
            if let generation { watch(export, slot: slot, generation: generation) }
        } catch {
            let failure =
                error as? NBDError ?? NBDError(.connectFailed, "cannot connect to \(uri)", connectionUsable: false, underlying: error)
            actions = machine.withLockedValue { $0.dialFailed(slot: slot, error: failure, now: ContinuousClock.now) }
        }
        perform(actions)
    }

    /// Reports the connection's end, however it comes: the server closing an idle connection
    /// tells no request.
    private func watch(_ export: NBDExport, slot: Int, generation: Int) {
        export.channel.closeFuture.whenComplete { [weak self, handler = export.handler] _ in
            guard let self else { return }
            // On the channel's event loop: the handler says why, when its machine ended it.
            let cause =
                handler.value.endReason
                ?? NBDError(.connectionClosed, "the server closed connection \(slot) (\(self.uri.address))", connectionUsable: false)
            self.perform(
                self.machine.withLockedValue {
                    $0.connectionLost(slot: slot, generation: generation, cause: cause, now: ContinuousClock.now)
                }
            )
        }
    }

    private func perform(_ actions: [Machine.Action]) {
        let logger = configuration.connection.logger
        for action in actions {
            switch action {
            case .dial(let slot, let secondary): work.continuation.yield(.dial(slot: slot, secondary: secondary))
            case .armTimer(let instant): work.continuation.yield(.timer(instant))
            case .resume(let waiter, let lease): waiter.resume(returning: lease)
            case .fail(let waiter, let error): waiter.resume(throwing: error)
            case .close(let export): work.continuation.yield(.close(export))
            case .finish(let error): work.continuation.yield(.finish(error))
            case .replay(let lease, let entries, let through): work.continuation.yield(.replay(lease, entries, through: through))
            case .flushLog: work.continuation.yield(.flushLog)
            case .emit(let event):
                switch event {
                case .connected: logger.debug("\(event)", metadata: ["uri": "\(uri)"])
                case .reconnected, .fewerConnections, .replayed: logger.notice("\(event)", metadata: ["uri": "\(uri)"])
                case .lost: logger.warning("\(event)", metadata: ["uri": "\(uri)"])
                case .gaveUp: logger.error("\(event)", metadata: ["uri": "\(uri)"])
                }
                eventSink.yield(event)
            }
        }
    }
}
