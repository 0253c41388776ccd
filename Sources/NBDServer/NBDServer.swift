import Logging
import NBDCore
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// One named export and the backend that stores it.
public struct NBDServerExport: Sendable {
    public var name: String
    public var description: String
    public var backend: any NBDServerBackend

    /// An export called `name` (the empty name is the default export).
    public init(name: String = "", description: String = "", backend: any NBDServerBackend) {
        self.name = name
        self.description = description
        self.backend = backend
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
public final class NBDServer: Sendable {
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
        /// Where connection and error logs go; by default nowhere.
        public var logger = Logger(label: "nbd-server", factory: { _ in SwiftLogNoOpLogHandler() })
        /// The defaults.
        public init() {}
    }

    private let channel: Channel
    private let connections: Connections

    /// The address the server listens on (with the port chosen when 0 was asked for).
    public var localAddress: SocketAddress? { channel.localAddress }

    private init(channel: Channel, connections: Connections) {
        self.channel = channel
        self.connections = connections
    }

    /// The client connections open now.
    final class Connections: Sendable {
        private let channels = NIOLockedValueBox<[ObjectIdentifier: Channel]>([:])

        /// Adds `channel` unless `limit` are open already.
        func admit(_ channel: Channel, limit: Int) -> Bool {
            let admitted = channels.withLockedValue { channels in
                guard channels.count < limit else { return false }
                channels[ObjectIdentifier(channel)] = channel
                return true
            }
            if admitted {
                channel.closeFuture.whenComplete { [self] _ in
                    _ = channels.withLockedValue { $0.removeValue(forKey: ObjectIdentifier(channel)) }
                }
            }
            return admitted
        }

        var all: [Channel] { channels.withLockedValue { Array($0.values) } }
    }

    /// Starts serving `exports` on `address` and returns once the socket listens.
    public static func start(
        exports: [NBDServerExport],
        on address: NBDAddress,
        configuration: Configuration = Configuration()
    ) async throws -> NBDServer {
        let connections = Connections()
        let bootstrap = ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.so_keepalive), value: 1)
            // Large reads: WRITE payloads are big, and each read costs a syscall.
            .childChannelOption(
                .recvAllocator,
                value: AdaptiveRecvByteBufferAllocator(minimum: 64 << 10, initial: 256 << 10, maximum: 1 << 20)
            )
            .childChannelInitializer { channel in
                guard connections.admit(channel, limit: configuration.maximumConnections) else {
                    configuration.logger.warning("refusing a client: \(configuration.maximumConnections) connections are open")
                    return channel.close()
                }
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        NBDServerChannelHandler(exports: exports, configuration: configuration, logger: configuration.logger)
                    )
                }
            }
        let channel: Channel
        switch address {
        case .tcp(let host, let port):
            channel = try await bootstrap.bind(host: host, port: port).get()
        case .unix(let path):
            channel = try await bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).get()
        case .abstractUnix:
            throw NBDError.invalidArgument("the server does not listen on abstract sockets")
        }
        configuration.logger.info("listening", metadata: ["address": "\(address)"])
        return NBDServer(channel: channel, connections: connections)
    }

    /// Stops listening, then ends every connection cleanly: requests in flight finish and are
    /// answered, new ones get `NBD_ESHUTDOWN` (as the spec asks of a server shutting down),
    /// clients still negotiating are closed. Returns when every connection is closed.
    public func shutdown() async {
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
    }

    /// Waits until the listening socket closes.
    public func wait() async {
        try? await channel.closeFuture.get()
    }
}
