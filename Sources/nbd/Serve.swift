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

            Examples:
              nbd serve disk.raw --name disk
              nbd serve --memory 1G --socket /tmp/nbd.sock
              nbd serve disk.raw --read-only --bind 0.0.0.0 --port 10810
            """
    )

    @Argument(help: "The file or block device to serve.")
    var file: String?

    @Option(help: ArgumentHelp("Serve a sparse in-memory disk of this size (K, M, G, T suffixes) instead of a file.", valueName: "size"),
            transform: Sizes.parse)
    var memory: UInt64?

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

    func validate() throws {
        guard (file == nil) != (memory == nil) else { throw ValidationError("give either a FILE or --memory SIZE") }
        guard (1...65535).contains(port) else { throw ValidationError("--port must be from 1 to 65535") }
    }

    func run() async throws {
        let backend: any NBDServerBackend
        if let memory {
            backend = MemoryBackend(size: memory, readOnly: readOnly)
        } else {
            do { backend = try FileBackend(path: file!, readOnly: readOnly) } catch let error as NBDServerError { throw CommandError(error.message) }
        }
        var configuration = NBDServer.Configuration()
        configuration.logger = Logger(label: "nbd-serve") { StreamLogHandler.standardError(label: $0) }
        let address: NBDAddress = socket.map { .unix(path: $0) } ?? .tcp(host: bind, port: port)
        let server: NBDServer
        do {
            server = try await NBDServer.start(exports: [NBDServerExport(name: name, description: description, backend: backend)],
                                               on: address, configuration: configuration)
        } catch {
            throw CommandError("cannot listen on \(address): \(error)")
        }
        let stop = StopSignals { Task { await server.shutdown() } }
        await server.wait()
        withExtendedLifetime(stop) {}
        // Requests already answered are on the backend; make them durable before exiting.
        if !readOnly { try await backend.flush() }
    }
}

/// SIGINT and SIGTERM run `action` once.
final class StopSignals: @unchecked Sendable {
    private var sources: [DispatchSourceSignal] = []

    init(_ action: @escaping @Sendable () -> Void) {
        for number in [SIGINT, SIGTERM] {
            var set = sigset_t()
            sigemptyset(&set)
            sigaddset(&set, number)
            pthread_sigmask(SIG_UNBLOCK, &set, nil)
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number)
            source.setEventHandler(handler: action)
            source.resume()
            sources.append(source)
        }
    }
}
