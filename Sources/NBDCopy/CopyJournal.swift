import Foundation
import NBD
import NBDCore
import NBDSystem
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// `nbd copy --resume FILE`: the ranges of the destination that were written and then flushed,
/// so that a copy started again with the same FILE copies only the rest.
///
/// A range is recorded only after a flush that followed its write's completion ("NBD_CMD_FLUSH
/// ... MUST NOT send a reply until all write commands ... that it has completed before
/// processing this command have been written to permanent storage"), and the file is replaced
/// whole (written beside it, synced, renamed): a crash leaves the old journal or the new one.
package final class CopyJournal: Sendable {
    /// What a journal is for: its copy's source and destination, as given (files by their full
    /// path), with their sizes, the dirty bitmap of an incremental copy, and the source's state
    /// (the caller's name for it, and what the source tells of itself).
    package struct Subject: Codable, Equatable, Sendable, CustomStringConvertible {
        package var source: String
        package var sourceSize: UInt64
        package var destination: String
        package var destinationSize: UInt64
        package var bitmap: String?
        /// ``CopyOptions/Journal/sourceState``.
        package var sourceState: String?
        /// ``CopySource/stateIdentity``.
        package var sourceIdentity: String?

        package init(
            source: String,
            sourceSize: UInt64,
            destination: String,
            destinationSize: UInt64,
            bitmap: String?,
            sourceState: String? = nil,
            sourceIdentity: String? = nil
        ) {
            self.source = source
            self.sourceSize = sourceSize
            self.destination = destination
            self.destinationSize = destinationSize
            self.bitmap = bitmap
            self.sourceState = sourceState
            self.sourceIdentity = sourceIdentity
        }

        package var description: String {
            "a copy of \(source) (\(sourceSize) bytes) onto \(destination) (\(destinationSize) bytes)"
                + (bitmap.map { " with the bitmap \($0)" } ?? "")
        }

        /// The same copy, whatever the source's state.
        func sameCopy(as other: Subject) -> Bool {
            var mine = self
            (mine.sourceState, mine.sourceIdentity) = (other.sourceState, other.sourceIdentity)
            return mine == other
        }
    }

    /// The file's contents.
    package struct Record: Codable, Sendable {
        package static let expectedFormat = "nbd copy journal"
        package var format = Record.expectedFormat
        package var version = 1
        package var subject: Subject
        /// True when the destination read as zeroes before the first run wrote to it (a new
        /// file): the runs after it may skip zero areas too, since every write any run made
        /// put the source's own bytes in place.
        package var destinationStartedZeroed: Bool
        /// `[start, end]` pairs, in order.
        package var done: [[UInt64]]
    }

    /// Records are read whole: a journal this large was not written by us.
    package static let maximumFileSize = 16 << 20
    /// How often what was written is flushed and recorded.
    package static let interval: Duration = .seconds(1)

    package let path: String
    package let subject: Subject
    package let destinationStartedZeroed: Bool
    /// What the journal held when this run began: the copy skips it.
    package let resumed: ByteRanges

    private struct State {
        /// Flushed and in the file.
        var durable: ByteRanges
        /// Written, not yet flushed.
        var pending = ByteRanges()
    }

    private let state: NIOLockedValueBox<State>

    package init(path: String, subject: Subject, destinationStartedZeroed: Bool, done: ByteRanges = ByteRanges()) {
        self.path = path
        self.subject = subject
        self.destinationStartedZeroed = destinationStartedZeroed
        self.resumed = done
        self.state = NIOLockedValueBox(State(durable: done))
    }

    package var doneBytes: UInt64 { state.withLockedValue { $0.durable.byteCount } }

    /// Called once every part of `range` was written (or needed nothing).
    package func completed(_ range: Range<UInt64>) {
        state.withLockedValue { $0.pending.insert(range) }
    }

    /// Flushes the destination and records what was written before the flush was sent.
    package func checkpoint(flushing destination: any CopyDestination) async throws {
        let taken = state.withLockedValue { state in
            defer { state.pending = ByteRanges() }
            return state.pending
        }
        guard !taken.ranges.isEmpty else { return }
        do {
            try await destination.flush()
        } catch {
            // Still written, still to be recorded by a later checkpoint.
            state.withLockedValue { $0.pending.formUnion(taken) }
            throw error
        }
        let done = state.withLockedValue { state in
            state.durable.formUnion(taken)
            return state.durable
        }
        try save(done)
    }

    /// How long a cancelled copy waits for its last checkpoint's flush.
    package static let cancelledGrace: Duration = .seconds(2)

    /// The checkpoint of a copy that did not complete, in a task of its own: a copy cancelled
    /// by its caller records its work all the same (an NBD flush fails at once in a cancelled
    /// task), but gives a destination that does not answer only ``cancelledGrace``.
    package func lastCheckpoint(flushing destination: any CopyDestination) async {
        let checkpoint = Task { _ = try? await self.checkpoint(flushing: destination) }
        guard Task.isCancelled else {
            await checkpoint.value
            return
        }
        let deadline = Task {
            try? await Task.sleep(for: Self.cancelledGrace)
            checkpoint.cancel()
        }
        await checkpoint.value
        deadline.cancel()
    }

    /// Runs `work` with a checkpoint every `interval`; a checkpoint that fails stops the work.
    package func checkpointing<T: Sendable>(
        flushing destination: any CopyDestination,
        _ work: @escaping @Sendable () async throws -> T
    ) async throws -> T {
        try await withThrowingTaskGroup(of: T?.self) { group in
            group.addTask { try await work() }
            group.addTask {
                while true {
                    try await Task.sleep(for: Self.interval)
                    try await self.checkpoint(flushing: destination)
                }
            }
            defer { group.cancelAll() }
            // The work ends first unless a checkpoint fails; the loop is then cancelled.
            while let result = try await group.next() {
                if let result { return result }
            }
            throw CancellationError()
        }
    }

    // MARK: The file

    /// Writes the journal as it is now.
    package func save() throws { try save(state.withLockedValue { $0.durable }) }

    private func save(_ done: ByteRanges) throws {
        let record = Record(
            subject: subject,
            destinationStartedZeroed: destinationStartedZeroed,
            done: done.ranges.map { [$0.lowerBound, $0.upperBound] }
        )
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        try Self.replace(path, with: try encoder.encode(record) + Data("\n".utf8))
    }

    /// The journal at `path`, or nil when there is none.
    package static func load(_ path: String) throws -> Record? {
        let descriptor = open(path, O_RDONLY | O_CLOEXEC)
        if descriptor < 0, errno == ENOENT { return nil }
        guard descriptor >= 0 else { throw NBDCopyError(.journal, "cannot read the journal \(path): \(String(cString: strerror(errno)))") }
        let handle = FileHandle(fileDescriptor: descriptor, closeOnDealloc: true)
        let data = try handle.read(upToCount: maximumFileSize + 1) ?? Data()
        let notOurs = "\(path) is not a journal of nbd copy"
        guard data.count <= maximumFileSize else { throw NBDCopyError(.journal, "\(notOurs) (it is larger than 16 MiB)") }
        guard let record = try? JSONDecoder().decode(Record.self, from: data), record.format == Record.expectedFormat else {
            throw NBDCopyError(.journal, "\(notOurs); remove it to start over")
        }
        guard record.version == 1 else {
            throw NBDCopyError(.journal, "the journal \(path) is of version \(record.version), and this nbd reads 1")
        }
        guard done(of: record) != nil else { throw NBDCopyError(.journal, "\(notOurs): its ranges are out of order or past the end") }
        return record
    }

    /// A record's ranges, when they are in order and within the source.
    package static func done(of record: Record) -> ByteRanges? {
        var ranges: [Range<UInt64>] = []
        for pair in record.done {
            guard pair.count == 2, pair[0] < pair[1], pair[1] <= record.subject.sourceSize else { return nil }
            ranges.append(pair[0]..<pair[1])
        }
        return ByteRanges(ordered: ranges)
    }

    /// Removes the journal of a copy that ended: nothing is left to resume.
    package func remove() throws {
        if unlink(path) != 0, errno != ENOENT {
            throw NBDCopyError(.journal, "cannot remove the journal \(path): \(String(cString: strerror(errno)))")
        }
    }

    /// Replaces `path` with `data`: written beside it, synced, renamed over it, and the folder
    /// synced, so that the name points to the old contents or the new, never to a part.
    private static func replace(_ path: String, with data: Data) throws {
        func failure(_ what: String) -> NBDCopyError {
            NBDCopyError(.journal, "cannot write the journal \(path): \(what): \(String(cString: strerror(errno)))")
        }
        let temporary = path + ".new"
        let descriptor = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard descriptor >= 0 else { throw failure("cannot create \(temporary)") }
        defer { _ = CLibrary.close(descriptor) }
        try data.withUnsafeBytes { bytes in
            if case .failure(let error) = FileIO.write(descriptor, bytes, at: 0) {
                throw NBDCopyError(.journal, "cannot write the journal \(path): \(error)")
            }
        }
        guard fsync(descriptor) == 0 else { throw failure("fsync") }
        guard rename(temporary, path) == 0 else { throw failure("rename") }
        let parent = (path as NSString).deletingLastPathComponent
        let folder = open(parent.isEmpty ? "." : parent, O_RDONLY | O_CLOEXEC)
        if folder >= 0 {
            _ = fsync(folder)
            _ = CLibrary.close(folder)
        }
    }
}

extension CopyJournal {
    /// The journal of this copy: `record`'s when it is for `subject` (a mismatch is refused),
    /// or a new one when there was none.
    package static func startOrResume(
        _ path: String,
        record: Record?,
        subject: Subject,
        destinationStartsZeroed: Bool
    ) throws -> CopyJournal {
        guard let record else {
            let journal = CopyJournal(path: path, subject: subject, destinationStartedZeroed: destinationStartsZeroed)
            // Written now: a run stopped before its first checkpoint still leaves what the next
            // run must know (that the destination started zeroed), and a bad path fails at once.
            try journal.save()
            return journal
        }
        guard record.subject.sameCopy(as: subject) else {
            throw NBDCopyError(.journal, "the journal \(path) is for \(record.subject), not for \(subject): remove it to start over")
        }
        guard !record.done.isEmpty else {
            // Nothing to mix: begun afresh, for the source as it is now.
            return CopyJournal(path: path, subject: subject, destinationStartedZeroed: record.destinationStartedZeroed)
        }
        try requireSameState(of: record.subject, as: subject, journal: path)
        return CopyJournal(
            path: path,
            subject: subject,
            destinationStartedZeroed: record.destinationStartedZeroed,
            done: done(of: record) ?? ByteRanges()
        )
    }

    /// The journal `options` name for a copy of `source` onto `destination`: the one found
    /// there when it is for this copy (another copy's is refused), or a new one.
    package static func forCopy(
        _ options: CopyOptions.Journal,
        source: any CopySource,
        destination: any CopyDestination
    ) throws -> CopyJournal {
        let record = try load(options.path)
        let subject = Subject(
            source: options.source,
            sourceSize: source.size ?? 0,
            destination: options.destination,
            destinationSize: destination.currentSize ?? 0,
            bitmap: source.cleanRangesName,
            sourceState: options.sourceState,
            sourceIdentity: source.stateIdentity
        )
        if let record, !record.done.isEmpty, destination.isNew {
            throw NBDCopyError(
                .journal,
                "the journal \(options.path) is for a copy onto \(options.destination), which was created or extended "
                    + "when it was opened: what the journal records is not in it; remove the journal to start over"
            )
        }
        return try startOrResume(options.path, record: record, subject: subject, destinationStartsZeroed: destination.startsZeroed)
    }

    /// A resumed copy "must never silently mix two states of its source": what the journal
    /// records as done was read from the source in its state then, and the rest will be read
    /// now. Throws unless the caller names the same state (``CopyOptions/Journal/sourceState``)
    /// or the source shows it is unchanged (``CopySource/stateIdentity``), and says what to do.
    package static func requireSameState(of recorded: Subject, as now: Subject, journal path: String) throws {
        let startOver = "remove the journal to start over"
        switch (recorded.sourceState, now.sourceState) {
        case (let before?, let given?) where before != given:
            throw NBDCopyError(
                .journal,
                "the journal \(path) holds what was copied of \(recorded.source) in the state \(before), not \(given): "
                    + "the two cannot be mixed; \(startOver)"
            )
        case (let before?, nil):
            throw NBDCopyError(
                .journal,
                "the journal \(path) holds what was copied of \(recorded.source) in the state \(before): "
                    + "name that state again (nbd copy --source-state \(before)) to resume, or \(startOver)"
            )
        case (let before?, let given?) where before == given:
            return
        default:
            break
        }
        if let before = recorded.sourceIdentity, let current = now.sourceIdentity {
            guard before == current else {
                throw NBDCopyError(
                    .journal,
                    "\(recorded.source) changed since the journal \(path) was written (it was \(before), it is \(current)): "
                        + "what the journal records as copied may be stale; \(startOver)"
                )
            }
            return
        }
        throw NBDCopyError(
            .journal,
            "the journal \(path) cannot tell whether \(recorded.source) is still in the state it was copied from "
                + "(an export can change between runs): name the state when a copy begins (nbd copy --source-state ID, "
                + "such as a snapshot's or a backup job's id) to resume it, or \(startOver)"
        )
    }
}
