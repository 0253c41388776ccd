import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NBDCore

/// Opens the socket and installs the client handler.
enum Dialer {
    static func dial(_ address: NBDAddress, configuration: NBDClientConfiguration) async throws -> (Channel, NIOLoopBound<NBDClientChannelHandler>) {
        let limits = configuration.negotiationLimits
        let inFlight = max(1, configuration.maximumRequestsInFlight)
        let timeout = configuration.negotiationTimeout
        let logger = configuration.logger
        // The handler is kept as it is added: a server that misbehaves at once can close the
        // channel, and empty its pipeline, before a lookup after connect() would run.
        let added = NIOLockedValueBox<NIOLoopBound<NBDClientChannelHandler>?>(nil)
        let bootstrap = ClientBootstrap(group: configuration.eventLoopGroup)
            .connectTimeout(configuration.connectTimeout)
            .channelOption(.socketOption(.so_keepalive), value: 1)
            // Large reads: data replies are big, and each read costs a syscall and a pass
            // through the state machine.
            .channelOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 64 << 10, initial: 256 << 10, maximum: 1 << 20))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let handler = NBDClientChannelHandler(eventLoop: channel.eventLoop, limits: limits, maximumInFlight: inFlight, negotiationTimeout: timeout, logger: logger)
                    try channel.pipeline.syncOperations.addHandler(handler)
                    added.withLockedValue { $0 = NIOLoopBound(handler, eventLoop: channel.eventLoop) }
                }
            }
        logger.debug("dialing", metadata: ["address": "\(address)"])
        let channel: Channel
        do {
            switch address {
            case .tcp(let host, let port):
                channel = try await bootstrap.channelOption(.socketOption(.tcp_nodelay), value: 1).connect(host: host, port: port).get()
            case .unix(let path):
                channel = try await bootstrap.connect(unixDomainSocketPath: path).get()
            case .abstractUnix(let name):
                channel = try await bootstrap.withConnectedSocket(try AbstractSocket.connect(name)).get()
            }
        } catch let error as NBDError {
            throw error
        } catch {
            throw NBDError(.connectionClosed, "cannot connect to \(address)", connectionUsable: false, underlying: error)
        }
        guard let handler = added.withLockedValue({ $0 }) else {
            try? await channel.close()
            throw NBDError(.connectionClosed, "cannot set up the connection to \(address)", connectionUsable: false)
        }
        return (channel, handler)
    }
}
