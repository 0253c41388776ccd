import NIOConcurrencyHelpers
import NIOCore
import NIOSSL
import NBDCore

/// A connection in the negotiation phase: handshake done, options can be sent.
///
/// Noncopyable: ``go(_:requests:)``, ``exportName(_:)``, ``abort()`` and ``close()`` consume
/// it, so nothing can be sent after negotiation has ended; I/O needs the ``NBDExport`` that GO
/// and EXPORT_NAME return. A connection dropped without either is ended softly
/// (`NBD_OPT_ABORT`), as the spec asks of clients.
///
/// ```swift
/// let connection = try await NBDConnection.connect(to: .unix(path: "/tmp/nbd.sock"))
/// for export in try await connection.list() { print(export.name) }
/// _ = try await connection.enableStructuredReplies()
/// let export = try await connection.go("disk")
/// ```
public struct NBDConnection: ~Copyable, Sendable {
    let channel: Channel
    let handler: NIOLoopBound<NBDClientChannelHandler>
    let configuration: NBDClientConfiguration
    private let guardian: Guardian

    /// The handshake flags the server sent.
    public let serverFlags: HandshakeFlags

    /// Dials `address`, completes the fixed-newstyle handshake, and returns the connection
    /// ready for options. Oldstyle and non-fixed-newstyle servers are refused with
    /// ``NBDError/Code-swift.struct/unsupportedServer``.
    public static func connect(to address: NBDAddress, configuration: NBDClientConfiguration = NBDClientConfiguration()) async throws -> NBDConnection {
        let (channel, handler) = try await Dialer.dial(address, configuration: configuration)
        let flags: HandshakeFlags
        do {
            flags = try await channel.eventLoop.flatSubmit { handler.value.handshake.futureResult }.get()
        } catch {
            try? await channel.close()
            throw error
        }
        let connection = NBDConnection(channel: channel, handler: handler, configuration: configuration, serverFlags: flags)
        if configuration.tls.policy != .disable {
            var hostname = configuration.tls.hostname
            if hostname == nil, case .tcp(let host, _) = address { hostname = host }
            try await connection.startTLS(configuration.tls, hostname: hostname)
        }
        return connection
    }

    /// `NBD_OPT_STARTTLS` and the TLS handshake on the same connection. Under `.require` a
    /// refusal or a failed handshake ends the connection (hard disconnect, as the spec requires
    /// after a failed TLS negotiation) with nothing else sent; under `.allow` a server without
    /// TLS is used in clear.
    private func startTLS(_ tls: NBDTLSConfiguration, hostname: String?) async throws {
        let handler = self.handler
        let sslContext: NIOSSLContext
        do {
            sslContext = try tls.makeContext()
        } catch {
            await hardClose()
            throw NBDError(.tlsFailed, "cannot load the TLS certificates or keys", connectionUsable: false, underlying: error)
        }
        let replies: [OptionReply.Body]
        do {
            replies = try await channel.eventLoop.flatSubmit { handler.value.send(.startTLS) }.get()
        } catch {
            await hardClose()
            throw error
        }
        if case .error(let type, let message) = replies.last {
            if tls.policy == .allow && [.errUnsupported, .errPolicy, .errPlatform].contains(type) {
                configuration.logger.debug("no TLS on this server; going on in clear", metadata: ["reply": "\(type)"])
                return
            }
            await hardClose()
            throw NBDError(.tlsRequired, "the server refused STARTTLS and TLS is required; nothing else was sent", optionReply: type,
                           serverMessage: message, connectionUsable: false)
        }
        do {
            try await channel.eventLoop.flatSubmit { handler.value.upgradeToTLS(sslContext, hostname: hostname) }.get()
        } catch {
            await hardClose()
            throw error
        }
    }

    /// After a failed TLS negotiation the spec wants a hard disconnect: nothing more is sent,
    /// not even the NBD_OPT_ABORT a dropped connection otherwise gets.
    private func hardClose() async {
        guardian.release()
        try? await channel.close()
    }

    /// Whether the connection is encrypted (STARTTLS succeeded).
    public var isTLS: Bool {
        get async { await tlsVersion != nil }
    }

    /// The TLS version agreed (for example `tlsv13`), or nil in clear.
    public var tlsVersion: String? {
        get async {
            let handler = self.handler
            return try? await channel.eventLoop.submit { handler.value.tlsVersion }.get()
        }
    }

    /// The TLS cipher suite agreed, by its IANA name (for example `TLS_AES_256_GCM_SHA384`),
    /// or nil in clear.
    public var tlsCipherSuite: String? {
        get async {
            let handler = self.handler
            return try? await channel.eventLoop.submit { handler.value.tlsCipherSuite }.get()
        }
    }

    /// Dials the server a URI names, completes the handshake and, for `nbds://` (or when the
    /// configuration asks), negotiates TLS with the URI's `tls-*` parameters.
    public static func connect(to uri: NBDURI, configuration: NBDClientConfiguration = NBDClientConfiguration()) async throws -> NBDConnection {
        var configuration = configuration
        // "If encryption cannot be negotiated then the connection MUST fail": nbds:// requires TLS
        // whatever the configuration says; the URI's tls-* parameters override the rest.
        configuration.tls.apply(uri)
        return try await connect(to: uri.address, configuration: configuration)
    }

    private init(channel: Channel, handler: NIOLoopBound<NBDClientChannelHandler>, configuration: NBDClientConfiguration, serverFlags: HandshakeFlags) {
        self.channel = channel
        self.handler = handler
        self.configuration = configuration
        self.serverFlags = serverFlags
        self.guardian = Guardian(channel: channel, handler: handler)
    }

    /// `NBD_OPT_LIST`: every export the server lists, with its description.
    public func list() async throws -> [NBDExportListing] {
        try await exchange(.list).compactMap { reply in
            guard case .server(let name, let description) = reply else { return nil }
            return NBDExportListing(name: name, description: description)
        }
    }

    /// `NBD_OPT_INFO`: describes an export without entering transmission.
    public func info(_ exportName: String = "", requests: [InfoType]? = nil) async throws -> NBDExportInfo {
        let replies = try await exchange(.info(export: exportName, requests: requests ?? configuration.infoRequests))
        return try NBDExportInfo(requestedName: exportName, replies: replies)
    }

    /// `NBD_OPT_STRUCTURED_REPLY`. Returns false when the server does not support it
    /// (`NBD_REP_ERR_UNSUP`); the connection then goes on with simple replies.
    @discardableResult
    public func enableStructuredReplies() async throws -> Bool {
        do {
            _ = try await exchange(.structuredReply)
            return true
        } catch let error as NBDError where error.optionReply == .errUnsupported {
            return false
        }
    }

    /// `NBD_OPT_LIST_META_CONTEXT`: the contexts of an export matching `queries` (all when empty).
    public func listMetaContexts(for exportName: String = "", queries: [String] = []) async throws -> [NBDMetaContext] {
        try await exchange(.listMetaContext(export: exportName, queries: queries)).compactMap(Self.metaContext)
    }

    /// `NBD_OPT_SET_META_CONTEXT`: selects the contexts for block status on `exportName` and
    /// returns them with the ids the server gave. Needs structured replies first. The ids are
    /// used to route block status replies; only a selection for the export that GO then opens
    /// counts.
    @discardableResult
    public func setMetaContexts(for exportName: String = "", queries: [String]) async throws -> [NBDMetaContext] {
        try await exchange(.setMetaContext(export: exportName, queries: queries)).compactMap(Self.metaContext)
    }

    /// `NBD_OPT_GO`: chooses the export and enters transmission. A server that does not know
    /// GO (`NBD_REP_ERR_UNSUP`) gets `NBD_OPT_EXPORT_NAME` instead, as libnbd does. On any
    /// other refusal the connection is ended softly and the error thrown.
    public consuming func go(_ name: String = "", requests: [InfoType]? = nil) async throws -> NBDExport {
        let replies: [OptionReply.Body]
        do {
            replies = try await exchange(.go(export: name, requests: requests ?? configuration.infoRequests))
        } catch let error as NBDError where error.optionReply == .errUnsupported {
            return try await exportName(name)
        } catch {
            await end()
            throw error
        }
        do {
            let info = try NBDExportInfo(requestedName: name, replies: replies)
            return try await makeExport(info)
        } catch {
            await end()
            throw error
        }
    }

    /// `NBD_OPT_EXPORT_NAME`: enters transmission on `name` the old way, with size and flags only.
    /// A server that refuses the export closes the connection, the only answer it has.
    public consuming func exportName(_ name: String) async throws -> NBDExport {
        let handler = self.handler
        do {
            let reply = try await channel.eventLoop.flatSubmit { handler.value.sendExportName(name) }.get()
            return try await makeExport(NBDExportInfo(name: name, size: reply.size, flags: reply.flags))
        } catch let error as NBDError where error.code == .connectionClosed {
            throw NBDError(.connectionClosed, "the server closed the connection after NBD_OPT_EXPORT_NAME \"\(name)\" (no such export, or it is refused)", connectionUsable: false)
        }
    }

    /// `NBD_OPT_ABORT`: the soft end of negotiation. Waits for the server's ACK (bounded by the
    /// negotiation timeout), then closes.
    public consuming func abort() async {
        await end()
    }

    /// Closes the socket at once (hard disconnect). Prefer ``abort()``: the spec lets a client
    /// drop the connection only after a violation by the server or a failed TLS negotiation.
    public consuming func close() async {
        try? await channel.close()
    }

    // MARK: Internals

    private func end() async {
        let handler = self.handler
        try? await channel.eventLoop.flatSubmit { handler.value.disconnect() }.get()
    }

    private func makeExport(_ info: NBDExportInfo) async throws -> NBDExport {
        let handler = self.handler
        let (negotiated, tlsVersion, tlsCipherSuite) = try await channel.eventLoop.submit {
            (handler.value.negotiated, handler.value.tlsVersion, handler.value.tlsCipherSuite)
        }.get()
        let contexts = negotiated.metaContextExport == negotiated.export && negotiated.structuredReplies ? negotiated.metaContexts : []
        guardian.release()
        return NBDExport(channel: channel, handler: handler, info: info, structuredReplies: negotiated.structuredReplies,
                         metaContexts: contexts, tlsVersion: tlsVersion, tlsCipherSuite: tlsCipherSuite,
                         configuration: configuration)
    }

    /// Sends an option and returns its replies; an error reply becomes a thrown ``NBDError``.
    private func exchange(_ request: OptionRequest) async throws -> [OptionReply.Body] {
        let handler = self.handler
        let replies = try await channel.eventLoop.flatSubmit { handler.value.send(request) }.get()
        guard case .error(let type, let message) = replies.last else { return replies }
        if type == .errShutdown {
            // "If the client receives NBD_REP_ERR_SHUTDOWN it MUST initiate a soft disconnect."
            await end()
        }
        throw Self.rejection(of: request.code, type, message)
    }

    static func rejection(of option: OptionCode, _ type: OptionReplyType, _ message: String) -> NBDError {
        let usable = type != .errShutdown
        if type == .errTLSRequired {
            return NBDError(.tlsRequired, "the server requires TLS for \(option); use an nbds:// URI", optionReply: type,
                            serverMessage: message, connectionUsable: usable)
        }
        return NBDError(.optionRejected, "the server refused \(option)", optionReply: type, serverMessage: message, connectionUsable: usable)
    }

    private static func metaContext(_ reply: OptionReply.Body) -> NBDMetaContext? {
        guard case .metaContext(let id, let name) = reply else { return nil }
        return NBDMetaContext(id: id, name: name)
    }

    /// Ends the negotiation softly if the connection is dropped before GO or EXPORT_NAME.
    final class Guardian: Sendable {
        private let channel: Channel
        private let handler: NIOLoopBound<NBDClientChannelHandler>
        private let released = NIOLockedValueBox(false)

        init(channel: Channel, handler: NIOLoopBound<NBDClientChannelHandler>) {
            self.channel = channel
            self.handler = handler
        }

        func release() { released.withLockedValue { $0 = true } }

        deinit {
            guard !released.withLockedValue({ $0 }) else { return }
            let handler = self.handler
            channel.eventLoop.execute { _ = handler.value.disconnect() }
        }
    }
}

/// One export of an `NBD_OPT_LIST` reply.
public struct NBDExportListing: Hashable, Sendable {
    /// The export name, as GO or EXPORT_NAME expect it.
    public var name: String
    /// The server's description; empty when it gave none.
    public var description: String
    /// A listing entry.
    public init(name: String, description: String) {
        self.name = name
        self.description = description
    }
}
