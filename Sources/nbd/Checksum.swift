import ArgumentParser
import Foundation
import NBD
import NBDCopy

/// `nbd checksum`: the blkhash of each source, printed as sha256sum prints digests.
struct Checksum: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print the blkhash of NBD exports, files or streams (what nbdcopy --blkhash SOURCE null: prints).",
        discussion: """
            SOURCE: anything nbd copy reads: an NBD URI, a file or block device, - (stdin), pattern:SIZE or zero:SIZE.

            Each line is the digest, two spaces and the source. The blkhash is the digest of the digests of the \
            blocks, then the size: zero areas (from block status) are not read, and a block of zeroes costs one \
            memcmp. It is not what sha256sum prints for the same bytes.

            Examples:
              nbd checksum nbd://localhost/disk
              nbd checksum --blkhash=sha512/1M disk.raw nbd+unix:///?socket=/tmp/nbd.sock
            """
    )

    @Argument(help: "What to hash.")
    var sources: [String]

    @Option(
        help: ArgumentHelp("md5, sha1, sha256 or sha512, optionally /BLOCKSIZE (default sha256/64K).", valueName: "digest"),
        transform: BlockHashSpecification.init(parsing:)
    )
    var blkhash = BlockHashSpecification.default

    @Option(help: "Connections per NBD export, when the server allows multi-conn.")
    var connections = 4

    @Option(help: "Requests in flight per connection.")
    var requests = CopyOptions().requests

    @OptionGroup var connection: ConnectionOptions

    func validate() throws {
        guard !sources.isEmpty else { throw ValidationError("name at least one source") }
        guard connections > 0, requests > 0 else { throw ValidationError("--connections and --requests must be positive") }
    }

    func run() async throws {
        var configuration = connection.clientConfiguration()
        // The data is hashed and dropped: taken as it arrived, in SwiftNIO's large reads.
        configuration.connection.readsDataDirectly = false
        let interrupt = Interrupt()
        var options = CopyOptions()
        options.requests = requests
        for text in sources {
            let hash = try await Endpoints.withSource(text, connections: connections, requests: requests, configuration: configuration) {
                source in
                try await checksum(of: source, specification: blkhash, options: options, stop: interrupt.stop)
            }
            guard let hash else {
                StandardStreams.error("nbd: interrupted\n")
                throw ExitCode(130)
            }
            StandardStreams.output("\(hash.hex)  \(text)\n")
        }
    }
}
