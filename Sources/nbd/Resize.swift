import ArgumentParser
import NBD

/// `nbd resize`: NBD_CMD_RESIZE, the experimental RESIZE extension, which no libnbd tool has.
struct Resize: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Change the size of an export (NBD_CMD_RESIZE, experimental), then flush.",
        discussion: """
            Needs a server that advertises NBD_FLAG_SEND_RESIZE (nbd serve --resizable; nbd info shows can_resize). \
            Growing adds bytes that read as zeroes. Shrinking destroys what lies past the new end: it asks first, \
            on a terminal; -y (--yes) does not ask, and is needed when standard input is not a terminal.

            Examples:
              nbd resize nbd://localhost/disk 20G
              nbd resize -y nbd+unix:///?socket=/tmp/nbd.sock 512M
            """
    )

    @Argument(help: "The export, as an NBD URI.")
    var uri: String

    @Argument(help: ArgumentHelp("The new size (K, M, G, T suffixes).", valueName: "size"), transform: Sizes.parse)
    var size: UInt64

    @Flag(name: [.customShort("y"), .long], help: "Do not ask before shrinking.")
    var yes = false

    @OptionGroup var connection: ConnectionOptions

    func run() async throws {
        try await connection.withSingleClient(uri) { client, info in
            guard info.canResize else {
                throw CommandError("the server cannot resize this export: it does not set NBD_FLAG_SEND_RESIZE")
            }
            if info.isReadOnly { throw CommandError("the export is read-only") }
            if size < info.size, !yes {
                let lost = info.size - size
                try EraseOptions.confirm(
                    "PERMANENTLY DISCARD the last \(lost) bytes of \(uri) (\(info.size) → \(size) bytes)",
                    doing: "shrink",
                    done: "resized"
                )
            }
            try await client.resize(to: size)
            if info.canFlush { try await client.flush() }
        }
    }
}
