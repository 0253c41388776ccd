import Logging
@_spi(NBDMachines) import NBDCore
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import ServiceLifecycle

/// One named export and the backend that stores it.
public struct NBDServerExport: Sendable {
    public var name: String
    public var description: String
    public var backend: any NBDServerBackend
    /// The largest size clients may give the export with `NBD_CMD_RESIZE`, the experimental
    /// RESIZE extension (advertised with `NBD_FLAG_SEND_RESIZE` unless the backend is
    /// read-only); nil, the default, when they may not resize it. A resize past it fails with
    /// `ENOSPC` and changes nothing, so that no client makes the server allocate what it likes.
    /// The backend's ``NBDServerBackend/resize(to:)`` does the work; the server keeps it apart
    /// from every other request and checks every connection's requests against the new size.
    public var maximumSize: UInt64?

    /// Whether clients may resize the export: it has a ``maximumSize``.
    public var isResizable: Bool { maximumSize != nil }

    /// An export called `name` (the empty name is the default export), which clients may
    /// resize up to `maximumSize` when one is given.
    public init(name: String = "", description: String = "", backend: any NBDServerBackend, resizableUpTo maximumSize: UInt64? = nil) {
        self.name = name
        self.description = description
        self.backend = backend
        self.maximumSize = maximumSize
    }
}

/// An NBD server: fixed newstyle, structured replies, `base:allocation`, many clients and many
/// requests in flight each.
///
/// ```swift
/// let server = try await NBDServer.start(
///     exports: [NBDServerExport(name: "disk", backend: MemoryBackend(size: 1 << 30))],
///     on: .unix(path: "/tmp/nbd.sock"))
/// // ... clients connect ...
/// await server.shutdown()
/// ```
///
/// It is a swift-service-lifecycle `Service`: in a `ServiceGroup`, ``run()`` serves until the
/// group shuts down gracefully (SIGTERM, say) or its task is cancelled, then stops cleanly.
public final class NBDServer: Service, Sendable {
    /// Limits that protect the server from its clients.
    public struct Configuration: Sendable {
        /// Longest option data accepted; longer ends the session.
        public var maximumOptionLength = 64 * 1024
        /// Largest READ or WRITE payload (advertised with NBD_INFO_BLOCK_SIZE).
        public var maximumPayload = 32 * 1024 * 1024
        /// Requests one client may have in flight; more ends its session.
        public var maximumRequestsInFlight = 1024
        /// Clients connected at once; more are closed as they arrive.
        public var maximumConnections = 256
        /// Clients still negotiating at once, below ``maximumConnections``: when one more
        /// arrives, the one that has negotiated longest is closed to make room, so that silent
        /// connections cannot lock out clients that negotiate.
        public var maximumNegotiatingConnections = 64
        /// A client that has not entered transmission this long after connecting is closed
        /// (qemu-nbd's `handshake-max-seconds`).
        public var handshakeTimeout: TimeAmount = .seconds(10)
        /// Bytes one connection may hold (WRITE data not yet stored, READ replies being made,
        /// replies not yet written) before its requests are no longer read; reading resumes
        /// at half. A connection holds at most this plus one ``maximumPayload``.
        public var maximumBufferedBytes = 64 * 1024 * 1024
        /// Bytes all connections together may hold for requests and replies, as
        /// ``maximumBufferedBytes`` counts them. A connection asks before it takes memory a
        /// client dictates (a WRITE's data before it is read, a READ's reply before it is
        /// made). Half the budget is guaranteed: each connection may always hold the budget
        /// over twice ``maximumConnections`` (2 MiB by default), so small requests always go
        /// on. The other half is shared, each connection within its share of it; past that,
        /// its requests wait unread until memory is freed: back-pressure, never a disconnect.
        /// At least twice ``maximumPayload``.
        public var memoryBudget = 1024 * 1024 * 1024
        /// A connection whose client reads none of its replies for this long, while its
        /// requests are not being read, is closed. Idle connections are kept.
        public var replyStallTimeout: TimeAmount = .seconds(60)
        /// TLS, when the server offers it (nil: it does not, as `--tls=off`).
        public var tls: NBDServerTLSConfiguration?
        /// The event loops that accept and serve connections.
        public var eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton
        /// Where connection and error logs go; by default nowhere.
        public var logger = Logger(label: "nbd-server", factory: { _ in SwiftLogNoOpLogHandler() })
        /// The defaults.
        public init() {}
    }

    private let channel: Channel
    let connections: Connections
    /// Every connection's requests, which may run on after their client has gone.
    private let requestGroups: RequestGroups
    /// What all connections hold, within ``Configuration/memoryBudget``.
    let memoryBudget: MemoryBudget
    /// The clean stop, once begun: every caller of ``shutdown()`` waits for the same one.
    private let stopping = NIOLockedValueBox<Task<Void, Never>?>(nil)

    /// The address the server listens on (with the port chosen when 0 was asked for).
    public var localAddress: SocketAddress? { channel.localAddress }

    /// Where a client on this host dials: ``localAddress``, but a wildcard address (every
    /// address of the host, which no client can dial) becomes loopback of its family.
    public var addressForLocalClients: SocketAddress? {
        guard let address = localAddress, let ip = address.ipAddress, let port = address.port,
            let loopback = ClearTextExposure.loopback(forWildcard: ip)
        else { return localAddress }
        return try? SocketAddress(ipAddress: loopback, port: port)
    }

    private init(channel: Channel, parts: Parts) {
        self.channel = channel
        self.connections = parts.connections
        self.requestGroups = parts.requestGroups
        self.memoryBudget = parts.memoryBudget
    }

    /// What the server's connections share.
    private struct Parts {
        let connections = Connections()
        let requestGroups = RequestGroups()
        let memoryBudget: MemoryBudget
    }

    /// The client connections open now, and which of them are still negotiating.
    final class Connections: Sendable {
        private struct State {
            var channels: [ObjectIdentifier: Channel] = [:]
            /// Negotiating connections, oldest first.
            var negotiating: [Channel] = []
        }
        private let state = NIOLockedValueBox(State())

        /// Adds `channel` unless `limit` are open already. When `negotiatingLimit` are still
        /// negotiating, the oldest of them is returned, to be closed to make room.
        func admit(_ channel: Channel, limit: Int, negotiatingLimit: Int) -> (admitted: Bool, evicted: Channel?) {
            let result = state.withLockedValue { state -> (Bool, Channel?) in
                var evicted: Channel?
                if state.negotiating.count >= negotiatingLimit, !state.negotiating.isEmpty {
                    evicted = state.negotiating.removeFirst()
                }
                guard state.channels.count - (evicted == nil ? 0 : 1) < limit else {
                    if let evicted { state.negotiating.insert(evicted, at: 0) }
                    return (false, nil)
                }
                state.channels[ObjectIdentifier(channel)] = channel
                state.negotiating.append(channel)
                return (true, evicted)
            }
            if result.0 {
                channel.closeFuture.whenComplete { [self] _ in
                    state.withLockedValue { state in
                        state.channels.removeValue(forKey: ObjectIdentifier(channel))
                        state.negotiating.removeAll { $0 === channel }
                    }
                }
            }
            return result
        }

        /// How many are open.
        var count: Int { state.withLockedValue { $0.channels.count } }

        /// `channel` entered transmission.
        func negotiated(_ channel: Channel) {
            state.withLockedValue { $0.negotiating.removeAll { $0 === channel } }
        }

        var all: [Channel] { state.withLockedValue { Array($0.channels.values) } }
    }

    /// Starts serving `exports` on `address` and returns once the socket listens. TLS
    /// credentials are read first: a missing or bad file throws `tlsFailed`, naming it.
    public static func start(
        exports: [NBDServerExport],
        on address: NBDAddress,
        configuration: Configuration = Configuration()
    ) async throws -> NBDServer {
        if case .abstractUnix = address { throw NBDError.invalidArgument("the server does not listen on abstract sockets") }
        return try await start(exports, configuration, listening: "\(address)") { bootstrap in
            switch address {
            case .tcp(let host, let port): try await bootstrap.bind(host: host, port: port).get()
            case .unix(let path), .abstractUnix(let path):
                try await bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).get()
            case .vsock:
                throw NBDError.invalidArgument("the server does not listen on vsock")
            }
        }
    }

    /// Starts serving `exports` on a socket that already listens, such as one systemd passes
    /// by socket activation (descriptor 3 when `LISTEN_FDS` is set): the server owns it from now.
    public static func start(
        exports: [NBDServerExport],
        listeningOn descriptor: CInt,
        configuration: Configuration = Configuration()
    ) async throws -> NBDServer {
        try await start(exports, configuration, listening: "descriptor \(descriptor)") { bootstrap in
            try await bootstrap.withBoundSocket(descriptor).get()
        }
    }

    private static func start(
        _ exports: [NBDServerExport],
        _ configuration: Configuration,
        listening description: String,
        _ bind: (ServerBootstrap) async throws -> Channel
    ) async throws -> NBDServer {
        // Half the budget is shared, and one request of the maximum payload must fit in it.
        guard configuration.memoryBudget >= 2 * configuration.maximumPayload else {
            throw NBDError.invalidArgument(
                "the memory budget of \(configuration.memoryBudget) bytes is less than twice the maximum payload, "
                    + "\(configuration.maximumPayload)"
            )
        }
        let budget = MemoryBudget(capacity: configuration.memoryBudget, holders: configuration.maximumConnections)
        let parts = Parts(memoryBudget: budget)
        let bootstrap = try bootstrap(exports: exports, configuration: configuration, parts: parts)
        let channel = try await bind(bootstrap)
        let address = channel.localAddress.map { "\($0)" } ?? "?"
        configuration.logger.info("listening", metadata: ["on": "\(description)", "address": "\(address)"])
        if let local = channel.localAddress, let warning = ClearTextExposure.warning(listeningOn: local, tls: configuration.tls) {
            configuration.logger.warning("\(warning)")
        }
        return NBDServer(channel: channel, parts: parts)
    }

    private static func bootstrap(exports: [NBDServerExport], configuration: Configuration, parts: Parts) throws -> ServerBootstrap {
        let tls = try ServerTLSCredentials.read(configuration.tls)
        let connections = parts.connections
        // One per resizable export, shared by all its connections.
        let gates = Dictionary(
            exports.filter(\.isResizable).map { ($0.name, ResizeGate(size: $0.backend.size)) },
            uniquingKeysWith: { first, _ in first }
        )
        let bootstrap = ServerBootstrap(group: configuration.eventLoopGroup)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.so_keepalive), value: 1)
            // Large reads: WRITE payloads are big, and each read costs a syscall.
            .childChannelOption(
                .recvAllocator,
                value: AdaptiveRecvByteBufferAllocator(minimum: 64 << 10, initial: 256 << 10, maximum: 1 << 20)
            )
            // Replies beyond the bound wait in the kernel, not in memory (see maximumBufferedBytes).
            .childChannelOption(
                .writeBufferWaterMark,
                value: .init(low: configuration.maximumBufferedBytes / 2, high: configuration.maximumBufferedBytes)
            )
            .childChannelInitializer { channel in
                let (admitted, evicted) = connections.admit(
                    channel,
                    limit: configuration.maximumConnections,
                    negotiatingLimit: configuration.maximumNegotiatingConnections
                )
                guard admitted else {
                    configuration.logger.warning("refusing a client: \(configuration.maximumConnections) connections are open")
                    return channel.close()
                }
                if let evicted {
                    configuration.logger.warning(
                        "closing the client that has negotiated longest: \(configuration.maximumNegotiatingConnections) are negotiating"
                    )
                    evicted.close(promise: nil)
                }
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        NBDServerChannelHandler(
                            exports: exports,
                            gates: gates,
                            configuration: configuration,
                            tls: tls,
                            requestGroups: parts.requestGroups,
                            memoryBudget: parts.memoryBudget,
                            logger: configuration.logger
                        ) {
                            connections.negotiated(channel)
                        }
                    )
                }
            }
        return bootstrap
    }

    /// Serves until the task is cancelled or the `ServiceGroup` it runs in shuts down
    /// gracefully; then stops as ``shutdown()`` does, and returns once every connection is
    /// closed and every backend call has returned.
    public func run() async throws {
        await withGracefulShutdownHandler {
            await withTaskCancellationHandler {
                await wait()
            } onCancel: {
                self.beginShutdown()
            }
        } onGracefulShutdown: {
            self.beginShutdown()
        }
        await beginShutdown().value
    }

    /// Stops listening, then ends every connection cleanly: requests in flight finish and are
    /// answered, new ones get `NBD_ESHUTDOWN` (as the spec asks of a server shutting down),
    /// clients still negotiating are closed. Returns when every connection is closed and every
    /// backend call has returned, those of clients that left before included.
    public func shutdown() async {
        await beginShutdown().value
    }

    /// The one clean stop, started on the first call.
    @discardableResult
    private func beginShutdown() -> Task<Void, Never> {
        stopping.withLockedValue { stopping in
            if let stopping { return stopping }
            let task = Task { await self.drain() }
            stopping = task
            return task
        }
    }

    private func drain() async {
        try? await channel.close()
        for connection in connections.all {
            let drained = connection.eventLoop.flatSubmit {
                guard let handler = try? connection.pipeline.syncOperations.handler(type: NBDServerChannelHandler.self) else {
                    return connection.close()
                }
                handler.shutDown()
                return connection.eventLoop.makeSucceededVoidFuture()
            }
            try? await drained.get()
            try? await connection.closeFuture.get()
        }
        await requestGroups.allEnded()
    }

    /// Stops at once, as a crash would: the listening socket and every connection are closed
    /// with no goodbye, and requests in flight get no reply. For tests of what clients do when
    /// a server dies; ``shutdown()`` is the clean way. Returns once the backend calls begun
    /// have returned, and leaves the backends untouched otherwise, so a new server can serve
    /// them again.
    public func close() async {
        try? await channel.close()
        for connection in connections.all {
            try? await connection.close()
        }
        await requestGroups.allEnded()
    }

    /// Waits until the listening socket closes.
    public func wait() async {
        try? await channel.closeFuture.get()
    }
}
