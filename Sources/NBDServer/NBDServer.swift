import Logging
import NIOCore
import NIOPosix
import NBDCore

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
        /// Where connection and error logs go; by default nowhere.
        public var logger = Logger(label: "nbd-server", factory: { _ in SwiftLogNoOpLogHandler() })
        /// The defaults.
        public init() {}
    }

    private let channel: Channel

    /// The address the server listens on (with the port chosen when 0 was asked for).
    public var localAddress: SocketAddress? { channel.localAddress }

    private init(channel: Channel) {
        self.channel = channel
    }

    /// Starts serving `exports` on `address` and returns once the socket listens.
    public static func start(exports: [NBDServerExport], on address: NBDAddress, configuration: Configuration = Configuration()) async throws -> NBDServer {
        let bootstrap = ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.so_keepalive), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        NBDServerConnectionHandler(exports: exports, configuration: configuration, logger: configuration.logger))
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
        return NBDServer(channel: channel)
    }

    /// Stops listening. Connections already open finish on their own.
    public func shutdown() async {
        try? await channel.close()
    }

    /// Waits until the listening socket closes.
    public func wait() async {
        try? await channel.closeFuture.get()
    }
}
