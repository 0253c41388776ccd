import ArgumentParser
import Dispatch
import Foundation
import NBD
import NBDCopy
import NIOConcurrencyHelpers
import NIOCore

#if canImport(Glibc)
import Glibc
#endif

/// `nbd copy`: copies between NBD exports, files, stdin/stdout and synthetic sources, like nbdcopy.
struct Copy: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Copy between NBD exports, local files and streams (like nbdcopy).",
        discussion: """
            SOURCE: an NBD URI, a file or block device, - (stdin), pattern:SIZE or zero:SIZE.
            DESTINATION: an NBD URI, a file or block device, - (stdout), or null: (discard).

            Sparse by default: zero areas of the source (from block status) are never read, and blocks that read as \
            zeroes are zeroed, not written. Several connections are used when the server allows multi-conn.

            Examples:
              nbd copy nbd://localhost/disk disk.raw
              nbd copy disk.raw nbd+unix:///?socket=/tmp/nbd.sock --flush
              nbd copy nbd://src/disk nbd://dst/disk --progress
              nbd copy pattern:1G nbd://localhost/disk
              nbd copy nbd://localhost/disk null:
              nbd copy --resume copy.journal nbd://src/disk nbd://dst/disk
            """
    )

    @Argument(help: "Where to read.")
    var source: String

    @Argument(help: "Where to write.")
    var destination: String

    @Option(help: "Connections per NBD export, when the server allows multi-conn.")
    var connections = 4

    @Option(help: "Requests in flight per connection.")
    var requests = CopyOptions().requests

    @Option(
        help: ArgumentHelp("Bytes per request (K, M, G, T suffixes); raised to the preferred block size.", valueName: "size"),
        transform: Sizes.parse
    )
    var requestSize: UInt64 = CopyOptions().requestSize

    @Option(
        help: ArgumentHelp(
            "The most memory the data in flight takes (K, M, G, T suffixes): requests in flight are capped at this over the "
                + "request size, with one per connection at least.",
            valueName: "size"
        ),
        transform: Sizes.parse
    )
    var memory: UInt64 = CopyOptions().memory

    @Option(
        help: ArgumentHelp(
            "Blocks of this many zero bytes (K, M, G, T suffixes) are zeroed, not written; 0 turns it off.",
            valueName: "bytes"
        ),
        transform: Sizes.parse
    )
    var sparse: UInt64 = 4096

    @Flag(
        name: [.long, .customLong("target-is-zero")],
        help: "The destination already reads as zeroes: write nothing for zero areas (also --target-is-zero, as nbdcopy)."
    )
    var destinationIsZero = false

    @Flag(help: "Leave the destination fully allocated: zero areas are written (or zeroed with NBD_CMD_FLAG_NO_HOLE), never holes.")
    var allocated = false

    @Flag(help: "Flush the destination at the end.")
    var flush = false

    @Option(
        help: ArgumentHelp(
            "Show progress on stderr: --progress alone as a bar (lines when not a terminal), --progress=json as a JSON object "
                + "a second, --progress=FD as N/100 lines on that descriptor.",
            valueName: "fd"
        )
    )
    var progress: String?

    @Option(
        help: ArgumentHelp(
            "Print the blkhash of the data (as nbdcopy 1.24 does): md5, sha1, sha256 or sha512, optionally /BLOCKSIZE; "
                + "--blkhash alone is sha256/64K.",
            valueName: "digest"
        ),
        transform: BlockHashSpecification.init(parsing:)
    )
    var blkhash: BlockHashSpecification?

    @Option(help: ArgumentHelp("Write the blkhash to this file rather than to stdout.", valueName: "file"))
    var blkhashFile: String?

    @Flag(help: "Flush, then read the destination back and check that its blkhash is the source's.")
    var verify = false

    @Option(
        help: ArgumentHelp(
            "Incremental: copy only what this dirty bitmap of the NBD source marks dirty (qemu:dirty-bitmap:NAME, or NAME), "
                + "onto an existing destination of the same size.",
            valueName: "context"
        )
    )
    var bitmap: String?

    @Option(
        help: ArgumentHelp(
            "Keep a journal of what was copied in this file: run the same command again after an interruption and only the "
                + "rest is copied. The journal is removed when the copy is complete.",
            valueName: "file"
        )
    )
    var resume: String?

    @Option(
        help: ArgumentHelp(
            "With --resume: the state of the source being copied, the same in every run (a snapshot's or a backup job's "
                + "id). A resume is refused unless the source is shown to be in the state the journal was written in: by "
                + "this, or by a source file's inode, size and change time.",
            valueName: "id"
        )
    )
    var sourceState: String?

    /// The journal `--resume` names, for this copy.
    var journal: CopyOptions.Journal? {
        resume.map {
            CopyOptions.Journal(
                path: $0,
                source: CopyJournalNames.name(of: source),
                destination: CopyJournalNames.name(of: destination),
                sourceState: sourceState
            )
        }
    }

    /// The bitmap's metadata context: a bare name is qemu's.
    var bitmapContext: NBDMetaContext? { bitmap.map { $0.contains(":") ? NBDMetaContext($0) : .dirtyBitmap($0) } }

    @OptionGroup var connection: ConnectionOptions

    func validate() throws {
        guard connections > 0, requests > 0, requestSize > 0, memory > 0 else {
            throw ValidationError("--connections, --requests, --request-size and --memory must be positive")
        }
        guard requestSize <= 32 << 20 else { throw ValidationError("--request-size must be at most 32M") }
        if let progress, progress != "auto", progress != "json", Int32(progress) == nil {
            throw ValidationError("--progress takes json or a file descriptor number, not \"\(progress)\"")
        }
        if blkhashFile != nil, blkhash == nil { throw ValidationError("--blkhash-file needs --blkhash") }
        if verify, destination == "null:" || destination == "-" {
            throw ValidationError("--verify needs a destination that can be read back, not \(destination)")
        }
        if allocated, destinationIsZero { throw ValidationError("--allocated and --destination-is-zero do not go together") }
        if bitmap != nil {
            guard Endpoints.isURI(source) else { throw ValidationError("--bitmap needs an NBD source") }
            guard destination != "null:", destination != "-" else {
                throw ValidationError("--bitmap copies onto an existing copy, not onto \(destination)")
            }
            guard !destinationIsZero else { throw ValidationError("--bitmap and --destination-is-zero do not go together") }
            // What the bitmap calls clean is not read, so there is no whole image to hash.
            guard blkhash == nil, !verify else {
                throw ValidationError("--bitmap reads only what changed: --blkhash and --verify need it all (use nbd checksum)")
            }
        }
        if sourceState != nil, resume == nil { throw ValidationError("--source-state goes with --resume") }
        if resume != nil {
            guard source != "-" else { throw ValidationError("--resume needs a source that can be read again, not stdin") }
            guard destination != "-", destination != "null:" else {
                throw ValidationError("--resume needs a destination that keeps what was written, not \(destination)")
            }
        }
    }

    func run() async throws {
        var configuration = connection.clientConfiguration()
        // Data read only to be thrown away is taken as it arrived (readSegments), where
        // SwiftNIO's large reads do best; data to be written is read straight into buffers.
        configuration.connection.readsDataDirectly = destination != "null:"
        // Taken before anything is opened: a second run of the same copy touches nothing.
        let lock = try journal?.lock()
        defer { lock?.release() }
        let previous = try journal?.recorded()
        let watch = ConnectionWatch()
        // Armed once both ends are open: until then Ctrl-C ends a connect that hangs at once.
        let interrupt = Interrupt(armed: false)
        try await Endpoints.withSource(
            self.source,
            connections: connections,
            requests: requests,
            bitmap: bitmapContext,
            configuration: configuration,
            watch: watch
        ) { source in
            if let previous, let journal {
                try journal.requireResumable(from: source)
                try CopyJournalNames.requireDestination(of: previous, destination: self.destination, journal: journal.path)
            }
            if bitmapContext != nil { try Self.requireExisting(self.destination, size: source.size) }
            let report = try await Endpoints.withDestination(
                self.destination,
                size: source.size,
                connections: connections,
                requests: requests,
                // What the first run knew of the destination still holds for the rest of it.
                destinationIsZero: destinationIsZero || previous?.destinationStartedZeroed == true,
                allocated: allocated,
                configuration: configuration,
                watch: watch
            ) { destination in
                interrupt.arm()
                return try await copy(source, to: destination, resuming: previous, watch: watch, stop: interrupt.stop)
            }
            guard !report.stopped else { return }
            if let hash = report.blockHash {
                if blkhash != nil { try output(hash) }
                if verify {
                    try await Verifier(copy: self, configuration: configuration).check(source: source, against: hash, stop: interrupt.stop)
                }
            }
        }
        if interrupt.happened {
            // 128 + SIGINT, as shells report a command ended by Ctrl-C.
            StandardStreams.error("nbd: interrupted: requests in flight were completed and the connections closed\n")
            if let resume { StandardStreams.error(Self.journalNote(resume)) }
            throw ExitCode(130)
        }
    }

    /// The copy itself, between open endpoints, with the progress shown.
    private func copy(
        _ source: any CopySource,
        to destination: any CopyDestination,
        resuming previous: RecordedCopy?,
        watch: ConnectionWatch,
        stop: CopyStop
    ) async throws -> CopyReport {
        var options = CopyOptions()
        options.requestSize = requestSize
        options.requests = requests
        options.memory = memory
        options.sparseBlockSize = Int(sparse)
        // Before --verify reads back over new connections: "the effects of NBD_CMD_FLUSH ...
        // MUST be visible across all connections" is all the spec promises them.
        options.flush = flush || verify
        options.blockHash = blkhash ?? (verify ? .default : nil)
        options.journal = journal
        if let previous, previous.doneBytes > 0 {
            StandardStreams.error("nbd: resuming: \(previous.doneBytes) of \(previous.sourceSize) bytes were copied already\n")
            if options.blockHash != nil { StandardStreams.error("nbd: the blkhash is made by reading the source again after the copy\n") }
        }
        let progress = CopyProgress(total: source.size)
        let renderer = try Progress(self.progress, of: progress, connections: watch)
        do {
            let report = try await NBDCopy.copy(from: source, to: destination, options: options, progress: progress, stop: stop)
            await renderer.finished()
            return report
        } catch {
            await renderer.finished()
            // Not for a refusal before the copy began: the journal is as it was, or not ours.
            let refused = (error as? NBDCopyError).map { [.invalidArgument, .sizeMismatch, .journal].contains($0.code) } ?? false
            if let resume, !refused { StandardStreams.error(Self.journalNote(resume)) }
            throw error
        }
    }

    /// What the journal holds after a run that did not complete, and how to go on.
    private static func journalNote(_ path: String) -> String {
        guard let recorded = try? CopyOptions.Journal(path: path, source: "", destination: "").recorded() else { return "" }
        return "nbd: the journal \(path) holds \(recorded.doneBytes) of \(recorded.sourceSize) bytes copied: "
            + "run the same command again to copy the rest\n"
    }

    /// An incremental copy goes onto the full copy it updates: a file must be there already,
    /// of the source's size (an NBD destination's size is checked once it is open).
    static func requireExisting(_ destination: String, size: UInt64?) throws {
        guard !Endpoints.isURI(destination) else { return }
        guard let file = Endpoints.onDisk(destination) else {
            throw CommandError("an incremental copy goes onto an existing copy, and \(destination) is not there")
        }
        if let size, let actual = file.regularSize, actual != size {
            throw CommandError("an incremental copy needs a destination of the source's size (\(size) bytes), not \(actual)")
        }
    }

    /// The digest on a line, on stdout or in --blkhash-file, as nbdcopy prints it.
    private func output(_ hash: BlockHash) throws {
        let line = hash.hex + "\n"
        guard let blkhashFile else {
            StandardStreams.output(line)
            return
        }
        do {
            try Data(line.utf8).write(to: URL(fileURLWithPath: blkhashFile))
        } catch {
            throw CommandError("cannot write the blkhash to \(blkhashFile): \(error.localizedDescription)")
        }
    }
}

/// Parses a source or destination argument.
enum Endpoints {
    /// A file destination as it is before it is opened.
    struct OnDisk {
        /// The size of a regular file; nil for a block device, whose size is known once open.
        let regularSize: UInt64?
    }

    /// What is at `path`, or nil when nothing is.
    static func onDisk(_ path: String) -> OnDisk? {
        var info = stat()
        guard stat(path, &info) == 0 else { return nil }
        return OnDisk(regularSize: (info.st_mode & S_IFMT) == S_IFREG ? UInt64(info.st_size) : nil)
    }

    static func unknownScheme(_ text: String) -> String {
        "unknown scheme in \"\(text)\" (expected \(NBDURI.schemes.joined(separator: ", ")))"
    }

    static func isURI(_ text: String) -> Bool {
        guard let colon = text.firstIndex(of: ":") else { return false }
        return NBDURI.schemes.contains(text[..<colon].lowercased())
    }

    /// Runs `body` with the source `text` names, and closes it after, whatever happened.
    static func withSource<T>(
        _ text: String,
        connections: Int,
        requests: Int,
        bitmap: NBDMetaContext? = nil,
        configuration: NBDClient.Configuration,
        watch: ConnectionWatch? = nil,
        _ body: (any CopySource) async throws -> T
    ) async throws -> T {
        let source = try await self.source(
            text,
            connections: connections,
            requests: requests,
            bitmap: bitmap,
            configuration: configuration,
            watch: watch
        )
        return try await closing(source.close) { try await body(source) }
    }

    /// Runs `body` with the destination `text` names, and closes it after, whatever happened.
    static func withDestination<T>(
        _ text: String,
        size: UInt64?,
        connections: Int,
        requests: Int,
        destinationIsZero: Bool,
        allocated: Bool,
        configuration: NBDClient.Configuration,
        watch: ConnectionWatch?,
        _ body: (any CopyDestination) async throws -> T
    ) async throws -> T {
        let destination = try await self.destination(
            text,
            size: size,
            connections: connections,
            requests: requests,
            destinationIsZero: destinationIsZero,
            allocated: allocated,
            configuration: configuration,
            watch: watch
        )
        return try await closing(destination.close) { try await body(destination) }
    }

    private static func closing<T>(_ close: () async -> Void, _ body: () async throws -> T) async throws -> T {
        let result: T
        do {
            result = try await body()
        } catch {
            await close()
            throw error
        }
        await close()
        return result
    }

    private static func source(
        _ text: String,
        connections: Int,
        requests: Int,
        bitmap: NBDMetaContext? = nil,
        configuration: NBDClient.Configuration,
        watch: ConnectionWatch? = nil
    ) async throws -> any CopySource {
        if isURI(text) {
            return try await NBDEndpoint.open(
                NBDURI(text),
                connections: connections,
                requests: requests,
                destinationIsZero: false,
                bitmap: bitmap,
                configuration: configuration,
                onEvent: watch?.listener(for: "source") ?? ConnectionWatch.ignore
            )
        }
        for (prefix, zero) in [("pattern:", false), ("zero:", true)] where text.hasPrefix(prefix) {
            return SyntheticSource(size: try Sizes.parse(String(text.dropFirst(prefix.count))), isZero: zero)
        }
        if text == "null:" { throw CommandError("null: can only be a destination") }
        if text.contains("://") { throw CommandError(Self.unknownScheme(text)) }
        return try FileEndpoint.source(text)
    }

    private static func destination(
        _ text: String,
        size: UInt64?,
        connections: Int,
        requests: Int,
        destinationIsZero: Bool,
        allocated: Bool = false,
        configuration: NBDClient.Configuration,
        watch: ConnectionWatch? = nil
    ) async throws -> any CopyDestination {
        if isURI(text) {
            return try await NBDEndpoint.open(
                NBDURI(text),
                connections: connections,
                requests: requests,
                destinationIsZero: destinationIsZero,
                allocates: allocated,
                configuration: configuration,
                onEvent: watch?.listener(for: "destination") ?? ConnectionWatch.ignore
            )
        }
        if text == "null:" { return NullDestination() }
        if text.hasPrefix("pattern:") || text.hasPrefix("zero:") { throw CommandError("\(text) can only be a source") }
        if text.contains("://") { throw CommandError(Self.unknownScheme(text)) }
        return try FileEndpoint.destination(text, size: size, destinationIsZero: destinationIsZero, allocates: allocated)
    }
}

/// SIGINT, once armed: the copy's stop is requested (requests in flight finish, no new work
/// starts). A second SIGINT exits at once, for a server that will never answer them. Until it
/// is armed, SIGINT ends the process as usual (while connecting, say).
final class Interrupt: Sendable {
    let stop = CopyStop()
    private let handler = NIOLockedValueBox<SignalHandler?>(nil)

    init(armed: Bool = true) {
        if armed { arm() }
    }

    /// From now on, SIGINT asks the stop.
    func arm() {
        let stop = self.stop
        handler.withLockedValue { handler in
            guard handler == nil else { return }
            handler = SignalHandler([SIGINT]) {
                if stop.request() {
                    StandardStreams.error("\nnbd: interrupted again: exiting without waiting for the requests in flight\n")
                    exit(130)
                }
            }
        }
    }

    var happened: Bool { stop.isRequested }
}
