@_spi(NBDMachines) import NBDCore
import NBDSystem
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

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
    /// `NBDError.Code.incompatibleServer`.
    ///
    /// Unless the TLS policy is `.disable`, `NBD_OPT_STARTTLS` and the TLS handshake follow on
    /// the same connection (`ClientConnectionStateMachine` decides what a refusal means:
    /// under `.require`, a hard disconnect with nothing else sent; under `.allow`, a server
    /// without TLS is used in clear).
    public static func connect(
        to address: NBDAddress,
        configuration: NBDClientConfiguration = NBDClientConfiguration()
    ) async throws -> NBDConnection {
        var hostname: String?
        if case .tcp(let host, _) = address { hostname = host }
        let tls = try tlsSetup(configuration, hostname: hostname)
        return try await handshake(Dialer.dial(address, configuration: configuration, tls: tls), configuration)
    }

    /// Completes the handshake on `socket`, a connected stream socket you opened (or were
    /// handed, by a parent process, say), as ``connect(to:configuration:)-(NBDAddress,_)`` does
    /// after dialing. The connection owns the descriptor from now on: it closes it at the end,
    /// and on failure. TLS certificates are checked against `configuration.tls.hostname`, or
    /// only for their chain without one.
    public static func connect(
        socket descriptor: CInt,
        configuration: NBDClientConfiguration = NBDClientConfiguration()
    ) async throws -> NBDConnection {
        let tls: NBDClientChannelHandler.TLSSetup?
        do {
            tls = try tlsSetup(configuration, hostname: nil)
        } catch {
            _ = CLibrary.close(descriptor)
            throw error
        }
        let dialed = try await Dialer.attach(
            descriptor,
            named: "descriptor \(descriptor)",
            isTCP: false,
            configuration: configuration,
            tls: tls
        )
        return try await handshake(dialed, configuration)
    }

    /// Starts `command` (its first element found on `PATH`) as a server that speaks NBD on its
    /// standard input and output, as libnbd's `nbd_connect_command` does (`nbdkit -s ...`,
    /// `nbd-server -c`...), and completes the handshake with it. The server serves this one
    /// connection: it gets SIGTERM when the connection closes (after a grace of 5 seconds,
    /// SIGKILL). A command that cannot start throws `connectFailed` saying why.
    public static func connect(
        command: [String],
        configuration: NBDClientConfiguration = NBDClientConfiguration()
    ) async throws -> NBDConnection {
        let tls = try tlsSetup(configuration, hostname: nil)
        let server: Subprocess
        let ours: CInt
        do {
            let (mine, theirs) = try Subprocess.socketPair()
            defer { _ = CLibrary.close(theirs) }
            do {
                server = try Subprocess(command, descriptors: [(theirs, 0), (theirs, 1)])
            } catch {
                _ = CLibrary.close(mine)
                throw error
            }
            ours = mine
        } catch let failure as Subprocess.Failure {
            throw NBDError(.connectFailed, failure.description, connectionUsable: false)
        }
        let dialed: Dialer.Dialed
        do {
            dialed = try await Dialer.attach(ours, named: server.name, isTCP: false, configuration: configuration, tls: tls)
        } catch {
            await Self.stop(server)
            throw error
        }
        dialed.channel.closeFuture.whenComplete { _ in Task { await Self.stop(server) } }
        return try await handshake(dialed, configuration)
    }

    /// Stops a server started for a connection, off the caller's thread.
    static func stop(_ server: Subprocess) async {
        _ = try? await NIOThreadPool.singleton.runIfActive { server.stop() }
    }

    /// TLS from `configuration` (nil when it is off): certificates and keys loaded before
    /// anything is sent, so that a bad file fails with nothing sent.
    private static func tlsSetup(_ configuration: NBDClientConfiguration, hostname: String?) throws -> NBDClientChannelHandler.TLSSetup? {
        guard configuration.tls.policy != .disable else { return nil }
        let name = configuration.tls.hostname ?? hostname
        do {
            return NBDClientChannelHandler.TLSSetup(context: try configuration.tls.makeContext(checkingName: name != nil), hostname: name)
        } catch let error as NBDError {
            throw error
        } catch {
            throw NBDError(.tlsFailed, "cannot load the TLS certificates or keys", connectionUsable: false, underlying: error)
        }
    }

    /// Waits for the handshake (and TLS) of a connection just set up.
    private static func handshake(_ dialed: Dialer.Dialed, _ configuration: NBDClientConfiguration) async throws -> NBDConnection {
        let flags: HandshakeFlags
        do {
            guard case .connected(let serverFlags) = try await dialed.handshake.get() else {
                throw NBDError(.connectionClosed, "the handshake ended without an answer", connectionUsable: false)
            }
            flags = serverFlags
        } catch {
            try? await dialed.channel.close()
            throw error
        }
        return NBDConnection(channel: dialed.channel, handler: dialed.handler, configuration: configuration, serverFlags: flags)
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
    public static func connect(
        to uri: NBDURI,
        configuration: NBDClientConfiguration = NBDClientConfiguration()
    ) async throws -> NBDConnection {
        var configuration = configuration
        if !configuration.uriMayReadLocalFiles {
            for (parameter, value) in [("tls-certificates", uri.tlsCertificates), ("tls-psk-file", uri.tlsPSKFile)] where value != nil {
                throw NBDError(
                    .invalidURI,
                    "the URI's \(parameter) parameter would read a local file, which this program does not allow "
                        + "(NBDClientConfiguration.uriMayReadLocalFiles)",
                    connectionUsable: false
                )
            }
        }
        // "If encryption cannot be negotiated then the connection MUST fail": nbds:// requires TLS
        // whatever the configuration says; the URI's tls-* parameters override the rest.
        configuration.tls.apply(uri)
        return try await connect(to: uri.address, configuration: configuration)
    }

    /// Parses `uri` and connects; see ``connect(to:configuration:)-(NBDURI,_)``.
    public static func connect(
        to uri: String,
        configuration: NBDClientConfiguration = NBDClientConfiguration()
    ) async throws -> NBDConnection {
        try await connect(to: NBDURI(uri), configuration: configuration)
    }

    private init(
        channel: Channel,
        handler: NIOLoopBound<NBDClientChannelHandler>,
        configuration: NBDClientConfiguration,
        serverFlags: HandshakeFlags
    ) {
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
    /// An export the server does not know fails with the names it lists, when it lists them.
    public func info(_ exportName: String = "", requests: [InfoType]? = nil) async throws -> NBDExportInfo {
        let replies: [OptionReply.Body]
        do {
            replies = try await exchange(.info(export: exportName, requests: requests ?? configuration.infoRequests))
        } catch let error as NBDError where error.optionReply == .errUnknown && error.connectionUsable {
            throw await unknownExport(exportName, error)
        }
        return try NBDExportInfo(requestedName: exportName, replies: replies)
    }

    /// `NBD_OPT_STRUCTURED_REPLY`. Returns false when the server refuses it (with
    /// `NBD_REP_ERR_UNSUP` or another error that leaves the connection usable); the connection
    /// then goes on with simple replies.
    @discardableResult
    public func enableStructuredReplies() async throws -> Bool {
        try await enable(.structuredReply)
    }

    /// `NBD_OPT_EXTENDED_HEADERS`: 32-byte requests and reply headers with 64-bit lengths,
    /// block status of 64-bit extents. Returns false when the server refuses it (`NBD_REP_ERR_UNSUP`
    /// from servers that predate it); the connection goes on as before. Once it is on,
    /// ``exportName(_:)`` may not be used ("a client MUST NOT use NBD_OPT_EXPORT_NAME").
    @discardableResult
    public func enableExtendedHeaders() async throws -> Bool {
        try await enable(.extendedHeaders)
    }

    /// Asks for the richest framing up to `format` and falls back step by step, as qemu does:
    /// extended headers, then structured replies, then simple replies. Returns what is in use.
    public func negotiateFormat(upTo format: TransmissionFormat = .extended) async throws -> TransmissionFormat {
        if format >= .extended, try await enableExtendedHeaders() { return .extended }
        if format >= .structured, try await enableStructuredReplies() { return .structured }
        return .simple
    }

    private func enable(_ option: OptionRequest) async throws -> Bool {
        do {
            _ = try await exchange(option)
            return true
        } catch let error as NBDError where error.code == .optionRejected && error.connectionUsable {
            configuration.logger.debug("option refused", metadata: ["option": "\(option.code)", "error": "\(error)"])
            return false
        }
    }

    /// `NBD_OPT_LIST_META_CONTEXT`: the contexts of an export matching `queries` (all when empty).
    public func listMetaContexts(for exportName: String = "", queries: [String] = []) async throws -> [NBDMetaContext] {
        try await exchange(.listMetaContext(export: exportName, queries: queries)).compactMap(Self.metaContext)
    }

    /// `NBD_OPT_SET_META_CONTEXT`: selects the contexts for block status on `exportName` and
    /// returns them with the ids the server gave. Needs structured replies or extended headers first. The ids are
    /// used to route block status replies; only a selection for the export that GO then opens
    /// counts.
    @discardableResult
    public func setMetaContexts(for exportName: String = "", queries: [String]) async throws -> [NBDMetaContext] {
        try await exchange(.setMetaContext(export: exportName, queries: queries)).compactMap(Self.metaContext)
    }

    /// `NBD_OPT_GO`: chooses the export and enters transmission. A server that does not know
    /// GO (`NBD_REP_ERR_UNSUP`) gets `NBD_OPT_EXPORT_NAME` instead, as the spec asks and libnbd
    /// does (the connection's state machine falls back). On any other refusal the connection is
    /// ended softly and the error thrown; an export the server does not know fails with the
    /// names it lists, when it lists them.
    public consuming func go(_ name: String = "", requests: [InfoType]? = nil) async throws -> NBDExport {
        let start: ClientTransmissionStart
        do {
            start = try await transmission(.go(export: name, requests: requests ?? configuration.infoRequests))
        } catch let error as NBDError where error.optionReply == .errUnknown && error.connectionUsable {
            let described = await unknownExport(name, error)
            await end()
            throw described
        } catch {
            await end()
            throw error
        }
        do {
            return try await makeExport(start)
        } catch {
            await end()
            throw error
        }
    }

    /// `NBD_OPT_EXPORT_NAME`: enters transmission on `name` the old way, with size and flags only.
    /// A server that refuses the export closes the connection, the only answer it has.
    public consuming func exportName(_ name: String) async throws -> NBDExport {
        let start = try await transmission(.exportName(name))
        return try await makeExport(start)
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

    /// Most export names an error lists: a server may offer thousands.
    static let namesInAnError = 10

    /// `NBD_REP_ERR_UNKNOWN` in words: which name was missing ("" is the default export, which
    /// people do not think of as a name) and, asked with `NBD_OPT_LIST` on the same connection,
    /// the names the server offers. A server that refuses to list (policy) is not asked twice.
    private func unknownExport(_ name: String, _ error: NBDError) async -> NBDError {
        let missing = name.isEmpty ? "default export, the empty name" : "export named \"\(name)\""
        var message = "the server has no \(missing)"
        if let listed = try? await list() {
            let names = listed.prefix(Self.namesInAnError).map { $0.name.isEmpty ? "the default export" : "\"\($0.name)\"" }
            let more = listed.count > names.count ? " and \(listed.count - names.count) more" : ""
            message =
                listed.isEmpty
                ? "the server lists no exports, and has no \(missing)"
                : "the server offers \(names.joined(separator: ", "))\(more), but no \(missing)"
        }
        return NBDError(
            .optionRejected,
            message,
            optionReply: error.optionReply,
            serverMessage: error.serverMessage,
            connectionUsable: error.connectionUsable
        )
    }

    private func end() async {
        let handler = self.handler
        try? await channel.eventLoop.flatSubmit { handler.value.disconnect() }.get()
    }

    private func makeExport(_ start: ClientTransmissionStart) async throws -> NBDExport {
        let handler = self.handler
        let (tlsVersion, tlsCipherSuite) = try await channel.eventLoop.submit { (handler.value.tlsVersion, handler.value.tlsCipherSuite) }
            .get()
        guardian.release()
        return NBDExport(
            channel: channel,
            handler: handler,
            info: start.info,
            transmissionFormat: start.format,
            metaContexts: start.metaContexts,
            tlsVersion: tlsVersion,
            tlsCipherSuite: tlsCipherSuite,
            configuration: configuration
        )
    }

    /// Sends an option and returns its replies; a refusal is thrown as an `NBDError`.
    private func exchange(_ request: OptionRequest) async throws -> [OptionReply.Body] {
        guard case .optionReplies(let replies) = try await outcome(of: request) else {
            throw NBDError(.connectionClosed, "no replies to \(request.code)", connectionUsable: false)
        }
        return replies
    }

    /// Sends GO or EXPORT_NAME and returns what transmission starts with.
    private func transmission(_ request: OptionRequest) async throws -> ClientTransmissionStart {
        guard case .transmissionStarted(let start) = try await outcome(of: request) else {
            throw NBDError(.connectionClosed, "\(request.code) did not start transmission", connectionUsable: false)
        }
        return start
    }

    private func outcome(of request: OptionRequest) async throws -> ClientConnectionOutcome {
        let handler = self.handler
        return try await channel.eventLoop.flatSubmit { handler.value.send(request) }.get()
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
