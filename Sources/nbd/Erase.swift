import ArgumentParser
import Foundation
import NBD

#if canImport(Glibc)
import Glibc
#endif

/// `nbd zero`: libnbd 1.24's nbdzero. The range reads as zeroes afterwards.
struct Zero: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Zero an export or a range of it (like nbdzero): NBD_CMD_WRITE_ZEROES, then a flush.",
        discussion: """
            Erasing the whole export asks first, on a terminal; -y (--yes) does not ask, and is needed when \
            standard input is not a terminal. A range given with --offset or --length is erased without \
            asking, unless it covers the whole export. With extended headers the whole range is one request.

            Examples:
              nbd zero nbd://localhost/disk
              nbd zero --offset 1M --length 64M nbd+unix:///?socket=/tmp/nbd.sock
            """
    )

    @OptionGroup var erase: EraseOptions

    @Flag(help: "Fail rather than write zeroes slowly (NBD_CMD_FLAG_FAST_ZERO).")
    var fastZero = false

    func run() async throws {
        try await erase.run { client, range in
            try await client.writeZeroes(at: range.lowerBound, length: UInt64(range.count), flags: fastZero ? .fastZero : [])
        }
    }
}

/// `nbd trim`: libnbd 1.24's nbddiscard. The server may free the range's storage.
struct Trim: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Discard an export or a range of it (like nbddiscard): NBD_CMD_TRIM, then a flush.",
        discussion: """
            The server may free the storage; what the range reads afterwards is up to it (nbd zero makes it \
            read as zeroes). Erasing the whole export asks first, on a terminal; -y (--yes) does not ask, and \
            is needed when standard input is not a terminal. A range given with --offset or --length is \
            discarded without asking, unless it covers the whole export.

            Examples:
              nbd trim nbd://localhost/disk
              nbd trim --offset 1G nbd+unix:///?socket=/tmp/nbd.sock
            """
    )

    @OptionGroup var erase: EraseOptions

    func run() async throws {
        try await erase.run { client, range in
            try await client.trim(at: range.lowerBound, length: UInt64(range.count))
        }
    }
}

/// What `nbd zero` and `nbd trim` share: the range, the question, the flush.
struct EraseOptions: ParsableArguments {
    @Argument(help: "The export, as an NBD URI.")
    var uri: String

    @Option(name: [.customShort("o"), .long], help: "Where to start (K, M, G, T suffixes; default 0).", transform: Sizes.parse)
    var offset: UInt64 = 0

    @Option(name: [.customShort("l"), .long], help: "How many bytes (K, M, G, T suffixes; default: to the end).", transform: Sizes.parse)
    var length: UInt64?

    @Flag(name: [.customShort("y"), .long], help: "Do not ask before erasing the whole export.")
    var yes = false

    @OptionGroup var connection: ConnectionOptions

    func run(_ perform: (NBDClient, Range<UInt64>) async throws -> Void) async throws {
        let uri = try NBDURI(self.uri)
        try await connection.withSingleClient(self.uri) { client, info in
            let end = try Sizes.range(offset: offset, length: length, in: info.size, lengthMayRunPast: false).upperBound
            guard end > offset else { return }
            if info.isReadOnly { throw CommandError("the export is read-only") }
            // Only the whole export is asked about (as nbdzero and nbddiscard do): a range the user
            // spelled out is what they meant. A range that happens to cover everything is everything.
            if !yes, offset == 0, end == info.size {
                try Self.confirm("PERMANENTLY ERASE everything on \(uri) (\(end) bytes)", doing: "erase", done: "erased")
            }
            try await perform(client, offset..<end)
            // The spec promises only that "all writes ... that the server completes" before a
            // flush's reply reach permanent storage: without it the zeroes could still be lost.
            if info.canFlush { try await client.flush() }
        }
    }

    /// Asks on the terminal before destroying data; anything but y or yes is no. Without a
    /// terminal, refuses: `doing` and `done` name the act ("erase", "erased").
    static func confirm(_ question: String, doing: String, done: String) throws {
        guard isatty(0) != 0 else {
            throw CommandError("refusing to \(doing) without -y: standard input is not a terminal to ask on")
        }
        StandardStreams.error("\(question)\n(y/N)? ")
        let answer = readLine()?.trimmingCharacters(in: .whitespaces).lowercased()
        guard answer == "y" || answer == "yes" else { throw CommandError("not \(done): the answer was not yes") }
    }
}
