import ArgumentParser
import Foundation
import Logging
import NBD
import NIOCore

/// `nbd`: the command-line tool. Errors are one line on stderr starting with `nbd: `, exit 1;
/// exit 2 is kept for the false answers of `info --can` / `--is`.
@main
struct NBDCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "nbd",
        abstract: "Network Block Device tools in Swift, in the spirit of libnbd's nbdinfo, nbdcopy and nbddump.",
        discussion: """
            Exports are named by NBD URIs: nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH (nbds:// and \
            nbds+unix:// for TLS, with tls-certificates=DIR or tls-psk-file=FILE).

            Examples:
              nbd info nbd://localhost/disk
              nbd info --json nbd+unix:///?socket=/tmp/nbd.sock
              nbd info --map nbd://localhost/disk
              nbd copy nbd://localhost/disk disk.raw --progress
              nbd checksum nbd://localhost/disk
              nbd zero nbd://localhost/disk
              nbd dump nbd://localhost/disk
            """,
        subcommands: [Info.self, Copy.self, Checksum.self, Zero.self, Trim.self, Resize.self, Dump.self, Serve.self]
    )

    static func main() async {
        StandardStreams.ignoreBrokenPipes()
        let servers = ServerCommands()
        do {
            let arguments = try await servers.start(in: rewritingOptionalValues(Array(CommandLine.arguments.dropFirst())))
            var command = try parseAsRoot(arguments)
            do {
                if var asyncCommand = command as? any AsyncParsableCommand {
                    try await asyncCommand.run()
                } else {
                    try command.run()
                }
            } catch {
                throw await servers.explain(error)
            }
            await servers.stop()
        } catch let exit as ExitCode {
            await servers.stop()
            Foundation.exit(exit.rawValue)
        } catch {
            await servers.stop()
            let code = exitCode(for: error)
            guard code != .success else { NBDCommand.exit(withError: error) }
            let message = error is NBDError || error is CommandError ? "\(error)" : fullMessage(for: error)
            let line = message.split(separator: "\n").first { !$0.trimmingCharacters(in: .whitespaces).isEmpty } ?? "failed"
            StandardStreams.error("nbd: \(line.replacingOccurrences(of: "Error: ", with: ""))\n")
            Foundation.exit(1)
        }
    }

    /// nbdinfo's `--map` and nbdcopy's `--progress` and `--blkhash` take an optional value
    /// (`--map` or `--map=CONTEXT`), which ArgumentParser cannot express: a bare `--map` becomes
    /// `--map=base:allocation`, a bare `--progress` becomes `--progress=auto`, a bare
    /// `--blkhash` becomes `--blkhash=sha256`.
    static func rewritingOptionalValues(_ arguments: [String]) -> [String] {
        arguments.map { argument in
            switch argument {
            case "--map": "--map=\(NBDMetaContext.baseAllocation.name)"
            case "--progress": "--progress=auto"
            case "--blkhash": "--blkhash=sha256"
            default: argument
            }
        }
    }
}

/// A failure of the tool itself (bad input), printed as one line.
struct CommandError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// Options every subcommand that connects shares.
struct ConnectionOptions: ParsableArguments {
    @Flag(name: .long, help: "Print the library's debug log on stderr.")
    var verbose = false

    @Flag(name: .long, help: "Require TLS, as nbds:// does.")
    var tls = false

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Directory with ca-cert.pem, and client-cert.pem and client-key.pem for client authentication.",
            valueName: "dir"
        )
    )
    var tlsCertificates: String?

    @Option(name: .long, help: ArgumentHelp("TLS-PSK key file in psktool format (username:hexkey lines).", valueName: "file"))
    var tlsPSKFile: String?

    @Option(name: .long, help: ArgumentHelp("The PSK user name (default: your login name).", valueName: "name"))
    var tlsUsername: String?

    @Flag(name: .long, inversion: .prefixedNo, help: "Verify the server's certificate (default: on).")
    var tlsVerifyPeer = true

    @Option(
        name: .long,
        help: ArgumentHelp("Give up when the server answers nothing for this long (0: wait for ever).", valueName: "seconds")
    )
    var timeout: Double = 60

    @Option(
        name: .long,
        help: ArgumentHelp(
            "When a connection is lost (the server restarted, the socket was reset), dial it again and send again what had "
                + "no reply, for up to this long (0: a lost connection fails the command).",
            valueName: "seconds"
        )
    )
    var reconnectDelay: Double = 0

    @Option(
        name: .long,
        help: ArgumentHelp(
            "With --reconnect-delay: write data answered and not yet flushed kept to send again to a server that restarted "
                + "(default 64M; K, M, G suffixes). Past it the client flushes by itself. 0 keeps none: a flush after a "
                + "restart that may have lost writes then fails, naming them.",
            valueName: "size"
        ),
        transform: Sizes.parse
    )
    var replayWindow: UInt64 = 64 << 20

    func validate() throws {
        guard timeout >= 0, timeout <= 31_536_000 else { throw ValidationError("--timeout must be from 0 to 31536000 seconds") }
        guard reconnectDelay >= 0, reconnectDelay <= 86400 else {
            throw ValidationError("--reconnect-delay must be from 0 to 86400 seconds")
        }
        guard replayWindow <= 1 << 40 else { throw ValidationError("--replay-window must be at most 1T") }
    }

    /// Runs `body` with a client of one connection to `uri` (for the commands that go in order:
    /// dump, info --map, zero, trim) and the export's description; `metaContexts` replaces the
    /// contexts asked for.
    func withSingleClient<Result>(
        _ uri: String,
        metaContexts: [NBDMetaContext]? = nil,
        _ body: (NBDClient, NBDExportInfo) async throws -> Result
    ) async throws -> Result {
        var configuration = clientConfiguration()
        configuration.connections = 1
        if let metaContexts { configuration.connection.metaContexts = metaContexts }
        return try await NBDClient.withClient(try NBDURI(uri), configuration: configuration) { client in
            try await body(client, try await client.info)
        }
    }

    /// The settings of an `NBDClient`: these connections' settings, and the reconnect delay.
    func clientConfiguration() -> NBDClient.Configuration {
        var configuration = NBDClient.Configuration()
        configuration.connection = self.configuration()
        configuration.reconnectDelay = .milliseconds(Int64((reconnectDelay * 1000).rounded()))
        configuration.replayWindow = Int(replayWindow)
        return configuration
    }

    func configuration() -> NBDClientConfiguration {
        var configuration = NBDClientConfiguration()
        // The URI comes from the person running the tool, as with libnbd's tools: its
        // tls-certificates and tls-psk-file may name their files.
        configuration.uriMayReadLocalFiles = true
        // nbds:// and the URI's tls-* parameters apply too; these flags are for nbd:// URIs.
        if tls || tlsCertificates != nil || tlsPSKFile != nil {
            configuration.tls = NBDTLSConfiguration(policy: .require)
            configuration.tls.pskFile = tlsPSKFile
            configuration.tls.pskUsername = tlsUsername
            if let tlsCertificates { configuration.tls.useCertificates(in: tlsCertificates) }
        }
        configuration.tls.verifyPeer = tlsVerifyPeer
        if timeout > 0 {
            let limit = Duration.nanoseconds(Int64(timeout * 1e9))
            configuration.requestTimeout = limit
            configuration.negotiationTimeout = min(configuration.negotiationTimeout, limit)
            configuration.connectTimeout = min(configuration.connectTimeout, limit)
        } else {
            // --timeout 0: a request waits for ever.
            configuration.requestTimeout = nil
        }
        if verbose {
            configuration.logger = Logger(label: "nbd") { StreamLogHandler.standardError(label: $0) }
            configuration.logger.logLevel = .trace
        }
        return configuration
    }
}
