import ArgumentParser
import Foundation
import Logging
import NBD
import NBDServer

/// `nbd serve`: the built-in server, for a file or for memory.
struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve a file, a block device or memory over NBD.",
        discussion: """
            Listens on localhost:10809 by default; --bind chooses another address, --socket a Unix socket. Stops on Ctrl-C or SIGTERM.

            More exports: --export NAME=FILE or --export NAME=memory:SIZE, as often as needed.

            Examples:
              nbd serve disk.raw --name disk
              nbd serve --memory 1G --socket /tmp/nbd.sock
              nbd serve disk.raw --read-only --bind 0.0.0.0 --port 10810
              nbd serve --memory 1G --name scratch --export iso=/srv/boot.iso --export big=memory:1T
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

    @Option(help: "TCP port.")
    var port = 10809

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

    func validate() throws {
        guard file == nil || memory == nil else { throw ValidationError("give either a FILE or --memory SIZE, not both") }
        guard file != nil || memory != nil || !extraExports.isEmpty else {
            throw ValidationError("give a FILE, --memory SIZE or --export NAME=SOURCE")
        }
        guard (1...65535).contains(port) else { throw ValidationError("--port must be from 1 to 65535") }
        guard handshakeTimeout > 0, handshakeTimeout <= 86400 else {
            throw ValidationError("--handshake-timeout must be more than 0 and at most 86400 seconds")
        }
        guard connectionBuffer >= 1 << 20, connectionBuffer <= 1 << 40 else {
            throw ValidationError("--connection-buffer must be from 1M to 1T")
        }
    }

    func run() async throws {
        var exports: [NBDServerExport] = []
        if let memory {
            exports.append(NBDServerExport(name: name, description: description, backend: MemoryBackend(size: memory, readOnly: readOnly)))
        } else if let file {
            exports.append(NBDServerExport(name: name, description: description, backend: try Self.fileBackend(file, readOnly: readOnly)))
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
            exports.append(NBDServerExport(name: exportName, backend: backend))
        }
        var configuration = NBDServer.Configuration()
        configuration.logger = Logger(label: "nbd-serve") { StreamLogHandler.standardError(label: $0) }
        configuration.handshakeTimeout = .nanoseconds(Int64(handshakeTimeout * 1e9))
        configuration.maximumBufferedBytes = Int(connectionBuffer)
        let address: NBDAddress = socket.map { .unix(path: $0) } ?? .tcp(host: bind, port: port)
        let server: NBDServer
        do {
            server = try await NBDServer.start(exports: exports, on: address, configuration: configuration)
        } catch {
            throw CommandError("cannot listen on \(address): \(error)")
        }
        let stopped = AsyncStream<Void>.makeStream()
        let stop = SignalHandler([SIGINT, SIGTERM]) {
            // Stop listening, let requests in flight finish, then return from run().
            Task {
                await server.shutdown()
                stopped.continuation.finish()
            }
        }
        for await _ in stopped.stream {}
        withExtendedLifetime(stop) {}
        // Connections have drained; make what they wrote durable before exiting.
        for export in exports where !export.backend.isReadOnly { try await export.backend.flush() }
        configuration.logger.info("stopped")
    }

    static func fileBackend(_ path: String, readOnly: Bool) throws -> FileBackend {
        do {
            return try FileBackend(path: path, readOnly: readOnly)
        } catch let error as NBDServerError {
            throw CommandError(error.message)
        }
    }
}
