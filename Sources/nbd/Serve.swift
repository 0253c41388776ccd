import ArgumentParser
import Foundation
import Logging
import NBD
import NBDServer
import ServiceLifecycle

#if canImport(Glibc)
import Glibc
#endif

/// `nbd serve`: the built-in server, for a file or for memory.
struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve a file, a block device or memory over NBD.",
        discussion: """
            Listens on localhost:10809 by default; --bind chooses another address, --socket a Unix socket, --port 0 a free \
            port (with --print-uri to learn it). Started by systemd with a socket (LISTEN_FDS), it serves that. Stops on \
            Ctrl-C or SIGTERM, after answering the requests in flight, or when its parent exits, with --exit-with-parent.

            More exports: --export NAME=FILE or --export NAME=memory:SIZE, as often as needed.

            --resizable MAX lets clients change the size of every export up to MAX (NBD_CMD_RESIZE, an experimental \
            extension that libnbd, qemu and nbdkit do not implement; a larger size fails with ENOSPC and changes \
            nothing): a file grows or shrinks with ftruncate, a memory disk in memory; a block device refuses.

            Memory: each connection holds at most --connection-buffer (64M) plus one request, and all together at most \
            --memory-budget (1G). Half the budget is each connection's own (the budget over 512, for the 256 connections \
            served at once), so small requests always go on; the other half is shared, each within its share. A \
            connection past either waits: its requests are read once memory is freed.

            TLS, in nbdkit's words: --tls-certificates DIR (ca-cert.pem, server-cert.pem, server-key.pem) or --tls-psk FILE \
            (psktool's username:hexkey lines) turn it on, required unless --tls=on; --tls-verify-peer requires a client \
            certificate signed by the folder's CA; --tls-allow IDENTITY (an X.509 subject such as CN=backup,O=Example, or a \
            PSK user name; as often as needed) serves only those clients.

            Examples:
              nbd serve disk.raw --name disk
              nbd serve --memory 1G --socket /tmp/nbd.sock
              nbd serve disk.raw --read-only --bind 0.0.0.0 --port 10810
              nbd serve --memory 1G --name scratch --export iso=/srv/boot.iso --export big=memory:1T
              nbd serve disk.raw --bind 0.0.0.0 --tls-certificates /etc/pki/nbd --tls-verify-peer --tls-allow CN=backup
            """
    )

    @Argument(help: "The file or block device to serve.")
    var file: String?

    @Option(
        help: ArgumentHelp("Serve a sparse in-memory disk of this size (K, M, G, T suffixes) instead of a file.", valueName: "size"),
        transform: Sizes.parse
    )
    var memory: UInt64?

    @Option(name: .customLong("export"), help: ArgumentHelp("Another export: NAME=FILE or NAME=memory:SIZE.", valueName: "name=source"))
    var extraExports: [String] = []

    @Option(help: "The export name (default: empty, the default export).")
    var name = ""

    @Option(help: "A description shown to clients.")
    var description = ""

    @Flag(help: "Refuse writes.")
    var readOnly = false

    @Option(
        help: ArgumentHelp("Let clients change the export's size up to this (NBD_CMD_RESIZE, experimental).", valueName: "max"),
        transform: Sizes.parse
    )
    var resizable: UInt64?

    @Option(help: "TCP port (default 10809); 0 lets the kernel choose one.")
    var port: Int?

    @Flag(help: "Print the URI of the export on standard output once the server listens.")
    var printUri = false

    @Flag(help: "Exit (cleanly) when the process that started this one exits.")
    var exitWithParent = false

    @Option(help: "Address to listen on.")
    var bind = "127.0.0.1"

    @Option(help: ArgumentHelp("Listen on this Unix socket instead of TCP.", valueName: "path"))
    var socket: String?

    @Option(help: ArgumentHelp("Close clients that have not finished negotiating after this long.", valueName: "seconds"))
    var handshakeTimeout: Double = 10

    @Option(
        help: ArgumentHelp("Memory one connection may hold before its requests wait (K, M, G, T suffixes).", valueName: "size"),
        transform: Sizes.parse
    )
    var connectionBuffer: UInt64 = 64 << 20

    @Option(
        help: ArgumentHelp(
            "Memory all connections together may hold for requests and replies (K, M, G, T suffixes); past it, requests wait.",
            valueName: "size"
        ),
        transform: Sizes.parse
    )
    var memoryBudget: UInt64 = 1 << 30

    @Option(
        help: ArgumentHelp(
            "off, on (TLS for clients that ask) or require (TLS or nothing; the default with credentials).",
            valueName: "mode"
        )
    )
    var tls: String?

    @Option(help: ArgumentHelp("X.509 credentials: ca-cert.pem, server-cert.pem and server-key.pem in this folder.", valueName: "dir"))
    var tlsCertificates: String?

    @Option(help: ArgumentHelp("TLS-PSK: the keys of a psktool file (username:hexkey lines).", valueName: "file"))
    var tlsPsk: String?

    @Flag(help: "Require a client certificate signed by the CA of --tls-certificates.")
    var tlsVerifyPeer = false

    @Option(help: ArgumentHelp("Serve only this TLS client: an X.509 subject (CN=...,O=...) or a PSK user name.", valueName: "identity"))
    var tlsAllow: [String] = []

    /// The TLS mode asked for: credentials turn TLS on, required unless said otherwise.
    var tlsMode: NBDServerTLSMode {
        switch tls {
        case "off": .off
        case "on": .on
        case "require": .require
        default: tlsCertificates != nil || tlsPsk != nil ? .require : .off
        }
    }

    func validate() throws {
        if let tls, !["off", "on", "require"].contains(tls) { throw ValidationError("--tls takes off, on or require, not \"\(tls)\"") }
        let credentials = tlsCertificates != nil || tlsPsk != nil
        if tlsMode == .off, credentials || tlsVerifyPeer || !tlsAllow.isEmpty {
            throw ValidationError("--tls=off does not go with --tls-certificates, --tls-psk, --tls-verify-peer or --tls-allow")
        }
        if tlsMode != .off, !credentials { throw ValidationError("--tls=\(tlsMode) needs --tls-certificates DIR or --tls-psk FILE") }
        if tlsCertificates != nil, tlsPsk != nil { throw ValidationError("give --tls-certificates or --tls-psk, not both") }
        if tlsVerifyPeer, tlsCertificates == nil { throw ValidationError("--tls-verify-peer needs --tls-certificates") }
        if !tlsAllow.isEmpty, tlsMode == .on {
            throw ValidationError("--tls-allow needs --tls=require: under --tls=on, clients in clear would pass it")
        }
        if !tlsAllow.isEmpty, tlsCertificates != nil, !tlsVerifyPeer {
            throw ValidationError("--tls-allow with certificates needs --tls-verify-peer: an unverified certificate can name anyone")
        }
        guard file == nil || memory == nil else { throw ValidationError("give either a FILE or --memory SIZE, not both") }
        guard file != nil || memory != nil || !extraExports.isEmpty else {
            throw ValidationError("give a FILE, --memory SIZE or --export NAME=SOURCE")
        }
        if resizable != nil, readOnly { throw ValidationError("--resizable and --read-only do not go together") }
        if let resizable, let memory, resizable < memory {
            throw ValidationError(
                "--resizable \(resizable) is less than the --memory size \(memory): give the largest size clients may ask"
            )
        }
        if let resizable, resizable > UInt64(Int64.max) { throw ValidationError("--resizable must be at most 2^63-1 bytes") }
        if let port, !(0...65535).contains(port) { throw ValidationError("--port must be from 0 to 65535") }
        if socket != nil, port != nil { throw ValidationError("--socket and --port do not go together") }
        guard handshakeTimeout > 0, handshakeTimeout <= 86400 else {
            throw ValidationError("--handshake-timeout must be more than 0 and at most 86400 seconds")
        }
        guard connectionBuffer >= 1 << 20, connectionBuffer <= 1 << 40 else {
            throw ValidationError("--connection-buffer must be from 1M to 1T")
        }
        // Half the budget is shared, and one request of the maximum payload must fit in it.
        let payload = UInt64(NBDServer.Configuration().maximumPayload)
        guard memoryBudget >= 2 * payload, memoryBudget <= 1 << 50 else {
            throw ValidationError("--memory-budget must be from \(2 * payload >> 20)M (twice the largest request) to 1P")
        }
    }

    func run() async throws {
        var exports: [NBDServerExport] = []
        if let memory {
            exports.append(
                NBDServerExport(
                    name: name,
                    description: description,
                    backend: MemoryBackend(size: memory, readOnly: readOnly),
                    resizableUpTo: resizable
                )
            )
        } else if let file {
            exports.append(
                NBDServerExport(
                    name: name,
                    description: description,
                    backend: try Self.fileBackend(file, readOnly: readOnly),
                    resizableUpTo: resizable
                )
            )
        }
        for spec in extraExports {
            guard let equals = spec.firstIndex(of: "=") else {
                throw CommandError("--export \(spec): expected NAME=FILE or NAME=memory:SIZE")
            }
            let exportName = String(spec[..<equals])
            let source = String(spec[spec.index(after: equals)...])
            guard !exports.contains(where: { $0.name == exportName }) else { throw CommandError("two exports are named \"\(exportName)\"") }
            let backend: any NBDServerBackend =
                source.hasPrefix("memory:")
                ? MemoryBackend(size: try Sizes.parse(String(source.dropFirst("memory:".count))), readOnly: readOnly)
                : try Self.fileBackend(source, readOnly: readOnly)
            exports.append(NBDServerExport(name: exportName, backend: backend, resizableUpTo: resizable))
        }
        var configuration = NBDServer.Configuration()
        configuration.logger = Logger(label: "nbd-serve") { StreamLogHandler.standardError(label: $0) }
        configuration.handshakeTimeout = .nanoseconds(Int64(handshakeTimeout * 1e9))
        configuration.maximumBufferedBytes = Int(connectionBuffer)
        configuration.memoryBudget = Int(memoryBudget)
        if tlsMode != .off {
            var tls =
                if let tlsPsk { NBDServerTLSConfiguration(mode: tlsMode, pskFile: tlsPsk) } else {
                    NBDServerTLSConfiguration(mode: tlsMode, certificates: tlsCertificates ?? "")
                }
            tls.verifyPeer = tlsVerifyPeer
            tls.allowedIdentities = tlsAllow.isEmpty ? nil : Set(tlsAllow)
            configuration.tls = tls
        }
        let server = try await start(exports, configuration: configuration)
        if printUri {
            StandardStreams.output(uri(of: server).description + "\n")
            if let bound = server.localAddress?.ipAddress, bound != server.addressForLocalClients?.ipAddress {
                configuration.logger.notice(
                    "the URI names loopback: \(bound) is every address of this host, which other hosts dial by name"
                )
            }
        }
        var services = [ServiceGroupConfiguration.ServiceConfiguration(service: server)]
        if exitWithParent {
            services.append(.init(service: ParentWatch(), successTerminationBehavior: .gracefullyShutdownGroup))
        }
        // Children of Swift concurrency threads start with these blocked: the group would
        // never hear them.
        SignalHandler.unblock([SIGINT, SIGTERM])
        let group = ServiceGroup(
            configuration: .init(services: services, gracefulShutdownSignals: [.sigterm, .sigint], logger: configuration.logger)
        )
        // On SIGINT or SIGTERM the server stops listening and answers what is in flight.
        try await group.run()
        // Connections have drained; make what they wrote durable before exiting.
        for export in exports where !export.backend.isReadOnly { try await export.backend.flush() }
        configuration.logger.info("stopped")
    }

    /// Starts the server: on the socket systemd passed (socket activation), or on the address
    /// the options name.
    private func start(_ exports: [NBDServerExport], configuration: NBDServer.Configuration) async throws -> NBDServer {
        do {
            if let activated = SocketActivation.take() {
                guard socket == nil, port == nil else {
                    throw CommandError("started with a socket (LISTEN_FDS): --socket and --port do not apply")
                }
                return try await NBDServer.start(exports: exports, listeningOn: activated, configuration: configuration)
            }
            let address: NBDAddress = socket.map { .unix(path: $0) } ?? .tcp(host: bind, port: port ?? 10809)
            do {
                return try await NBDServer.start(exports: exports, on: address, configuration: configuration)
            } catch let error as NBDError where error.code == .tlsFailed {
                throw error
            } catch {
                throw CommandError("cannot listen on \(address): \(error)")
            }
        } catch let error as NBDError where error.code == .tlsFailed {
            throw CommandError(error.message)
        }
    }

    /// The URI a client on this host uses for the first export, from the socket the server
    /// listens on: its path (systemd's socket too), or the port the kernel chose when 0 was
    /// asked; a wildcard address (every address of the host) becomes loopback.
    private func uri(of server: NBDServer) -> NBDURI {
        let requiresTLS = tlsMode == .require
        let address = server.addressForLocalClients
        if let path = address?.pathname ?? socket { return NBDURI(socket: path, exportName: name, requiresTLS: requiresTLS) }
        return NBDURI(host: address?.ipAddress ?? bind, port: address?.port ?? port ?? 10809, exportName: name, requiresTLS: requiresTLS)
    }

    static func fileBackend(_ path: String, readOnly: Bool) throws -> FileBackend {
        do {
            return try FileBackend(path: path, readOnly: readOnly)
        } catch let error as NBDServerError {
            throw CommandError(error.message)
        }
    }
}
