@_spi(NBDMachines) import NBDCore
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// Opens the socket and installs the client handler.
enum Dialer {
    /// The channel, its handler, and the outcome of the handshake (with TLS when the policy asks).
    struct Dialed {
        let channel: Channel
        let handler: NIOLoopBound<NBDClientChannelHandler>
        let handshake: EventLoopFuture<ClientConnectionOutcome>
    }

    static func dial(
        _ address: NBDAddress,
        configuration: NBDClientConfiguration,
        tls: NBDClientChannelHandler.TLSSetup?
    ) async throws -> Dialed {
        configuration.logger.debug("dialing", metadata: ["address": "\(address)"])
        // Connected here, not by SwiftNIO, so that the client knows the descriptor.
        let socket = try await SocketConnector.connect(to: address, timeout: TimeAmount(configuration.connectTimeout))
        var isTCP = false
        if case .tcp = address { isTCP = true }
        return try await attach(socket, named: "\(address)", isTCP: isTCP, configuration: configuration, tls: tls)
    }

    /// Sets up the connection on `socket`, a connected stream socket the connection owns from
    /// now on (closed on failure too); `name` says where it leads, in messages.
    static func attach(
        _ socket: NIOBSDSocket.Handle,
        named name: String,
        isTCP: Bool,
        configuration: NBDClientConfiguration,
        tls: NBDClientChannelHandler.TLSSetup?
    ) async throws -> Dialed {
        let machineConfiguration = NBDClientChannelHandler.Machine.Configuration(
            limits: ClientNegotiationStateMachine.Limits(
                maximumReplyLength: configuration.maximumOptionReplyLength,
                maximumRepliesLength: configuration.maximumOptionRepliesLength
            ),
            maximumRequestsInFlight: configuration.maximumRequestsInFlight,
            negotiationTimeout: TimeAmount(configuration.negotiationTimeout),
            tlsPolicy: configuration.tls.policy,
            requestTimeout: configuration.requestTimeout.map(TimeAmount.init)
        )
        let logger = configuration.logger
        let directRead = configuration.readsDataDirectly ? DirectRead(socket: socket) : nil
        // The handler is kept as it is added: a server that misbehaves at once can close the
        // channel, and empty its pipeline, before a lookup after connect() would run.
        let added = NIOLockedValueBox<(NIOLoopBound<NBDClientChannelHandler>, EventLoopFuture<ClientConnectionOutcome>)?>(nil)
        var bootstrap = ClientBootstrap(group: configuration.eventLoopGroup)
            .channelOption(.socketOption(.so_keepalive), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let handshake = channel.eventLoop.makePromise(of: ClientConnectionOutcome.self)
                    let handler = NBDClientChannelHandler(
                        eventLoop: channel.eventLoop,
                        configuration: machineConfiguration,
                        tls: tls,
                        directRead: directRead,
                        logger: logger,
                        handshake: handshake
                    )
                    try channel.pipeline.syncOperations.addHandler(handler)
                    added.withLockedValue { $0 = (NIOLoopBound(handler, eventLoop: channel.eventLoop), handshake.futureResult) }
                }
            }
        if directRead != nil {
            // The client reads itself (DirectRead): SwiftNIO reads a little per wakeup.
            bootstrap =
                bootstrap
                .channelOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: DirectRead.wakeupReadSize))
                .channelOption(.maxMessagesPerRead, value: 1)
        } else {
            bootstrap =
                bootstrap
                .channelOption(.recvAllocator, value: receiveAllocator)
                .channelOption(.maxMessagesPerRead, value: readsPerEvent)
        }
        if isTCP {
            bootstrap = bootstrap.channelOption(.socketOption(.tcp_nodelay), value: 1)
        }
        let channel: Channel
        do {
            channel = try await bootstrap.withConnectedSocket(socket).get()
        } catch {
            throw NBDError(.connectFailed, "cannot set up the connection to \(name)", connectionUsable: false, underlying: error)
        }
        guard let (handler, handshake) = added.withLockedValue({ $0 }) else {
            try? await channel.close()
            throw NBDError(.connectFailed, "cannot set up the connection to \(name)", connectionUsable: false)
        }
        return Dialed(channel: channel, handler: handler, handshake: handshake)
    }

    /// SwiftNIO's reads when it reads every byte (over TLS, or without direct reads): large,
    /// because data replies are big and each read costs a syscall and a pass through the
    /// state machine.
    static var receiveAllocator: AdaptiveRecvByteBufferAllocator {
        AdaptiveRecvByteBufferAllocator(minimum: 64 << 10, initial: 256 << 10, maximum: 1 << 20)
    }

    /// SwiftNIO's reads in a row per wakeup once it reads every byte.
    static let readsPerEvent: ChannelOptions.Types.MaxMessagesPerReadOption.Value = 4
}
