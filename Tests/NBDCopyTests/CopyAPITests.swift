import Foundation
import NBDCopy
import NIOConcurrencyHelpers
import NIOCore
import TestSupport
import Testing

/// The library's public calls, between endpoints in memory and in files: copy, checksum and
/// verify, their refusals, and copies cancelled or stopped at random points, then resumed.
@Suite("copy, checksum and verify")
struct CopyAPITests {
    static let size = 4 << 20

    func options(blockHash: BlockHashSpecification? = nil, journal: CopyOptions.Journal? = nil) -> CopyOptions {
        var options = CopyOptions()
        options.requestSize = 64 << 10
        options.requests = 8
        options.blockHash = blockHash
        options.journal = journal
        return options
    }

    @Test func aCopyReportsItsBytesAndTheSourcesBlockHash() async throws {
        let bytes = image(Self.size)
        let source = MemorySource(bytes)
        let destination = MemoryDestination(size: Self.size, initial: 0x55)
        let progress = CopyProgress(total: source.size)
        let report = try await copy(from: source, to: destination, options: options(blockHash: .default), progress: progress)
        #expect(report.bytes == UInt64(Self.size) && report.resumedBytes == 0 && !report.stopped)
        #expect(firstDifference(destination.bytes, bytes) == nil)
        let expected = try #require(await checksum(of: MemorySource(bytes)))
        #expect(report.blockHash == expected)
        #expect(progress.snapshot.finished && progress.snapshot.done == UInt64(Self.size))
        #expect(try await verify(MemorySource(destination.bytes), matches: expected))
    }

    @Test func verifyNamesTheFirstBlockThatDiffers() async throws {
        let bytes = image(Self.size)
        let hash = try #require(await checksum(of: MemorySource(bytes), specification: try BlockHashSpecification(.sha256)))
        for offset in [0, 65536 * 5 + 17, Self.size - 1] {
            var changed = bytes
            changed[offset] ^= 0xFF
            let block = offset / 65536
            let expected =
                "verify failed: the destination differs from the source first in block \(block) of 64K, "
                + "bytes \(block * 65536)..<\((block + 1) * 65536)"
            await #expect {
                try await verify(MemorySource(changed), matches: hash, source: MemorySource(bytes))
            } throws: { error in
                let error = error as? NBDCopyError
                return error?.code == .verificationFailed && error?.message == expected
            }
        }
        // Without a source to read again, the 16 MiB region is named.
        var changed = bytes
        changed[1000] = 0
        await #expect {
            try await verify(MemorySource(changed), matches: hash)
        } throws: { ($0 as? NBDCopyError)?.message == "verify failed: the destination differs from the source in bytes 0..<\(Self.size)" }
        // A copy too short is named as such, before anything is read.
        await #expect {
            try await verify(MemorySource(Array(bytes.prefix(1000))), matches: hash)
        } throws: { ($0 as? NBDCopyError)?.message == "verify failed: the destination has 1000 bytes, and the source \(Self.size)" }
        // Stopped before the end: no verdict either way.
        let stop = CopyStop()
        stop.request()
        #expect(try await verify(MemorySource(changed), matches: hash, stop: stop) == false)
    }

    @Test func whatCannotFitIsRefusedBeforeAnythingIsWritten() async throws {
        let source = MemorySource(image(Self.size))
        let small = MemoryDestination(size: Self.size / 2)
        await #expect {
            try await copy(from: source, to: small)
        } throws: { ($0 as? NBDCopyError)?.code == .sizeMismatch }
        #expect(small.writes == 0 && source.reads == 0)
        var bad = CopyOptions()
        bad.requestSize = 64 << 20
        await #expect { try await copy(from: source, to: MemoryDestination(size: Self.size), options: bad) } throws: {
            ($0 as? NBDCopyError)?.code == .invalidArgument
        }
        let journal = CopyOptions.Journal(path: "/nonexistent/journal", source: "a", destination: "b")
        await #expect { try await copy(from: source, to: .null, options: options(journal: journal)) } throws: {
            ($0 as? NBDCopyError)?.code == .invalidArgument
        }
    }

    /// A source with a dirty bitmap: only the dirty ranges are read and written, onto a
    /// destination of the source's size; a blkhash, or a destination of another size, is refused.
    @Test func anIncrementalCopyCopiesOnlyWhatIsDirty() async throws {
        let old = image(Self.size, seed: 1)
        var new = old
        let dirty: [Range<UInt64>] = [65536..<131072, 1_048_576..<1_310_720]
        for range in dirty {
            for index in Int(range.lowerBound)..<Int(range.upperBound) { new[index] = 0xA5 }
        }
        let source = BitmapSource(MemorySource(new), dirty: dirty, size: UInt64(Self.size))
        let destination = MemoryDestination(size: Self.size, initial: 0)
        _ = try await copy(from: MemorySource(old), to: destination, options: options())
        let report = try await copy(from: source, to: destination, options: options())
        #expect(report.bytes == UInt64(Self.size) && report.skippedBytes == UInt64(Self.size) - (65536 + 262_144))
        #expect(firstDifference(destination.bytes, new) == nil)
        #expect(source.inner.reads == 5, "one 64K piece and four of the 256K range")
        await #expect { try await copy(from: source, to: MemoryDestination(size: Self.size * 2)) } throws: {
            ($0 as? NBDCopyError)?.code == .sizeMismatch
        }
        await #expect { try await copy(from: source, to: destination, options: options(blockHash: .default)) } throws: {
            ($0 as? NBDCopyError)?.code == .invalidArgument
        }
        await #expect { try await checksum(of: source) } throws: { ($0 as? NBDCopyError)?.code == .invalidArgument }
    }

    /// Cancelled at a random write (the writes in flight abandoned), or stopped after a random
    /// number of writes, then run again with the same journal: the destination ends as the
    /// source, and the journal is gone.
    @Test(arguments: 0..<12)
    func aCopyCutAtARandomPointResumesToTheSameBytes(seed: Int) async throws {
        let folder = try temporaryFolder()
        defer { try? FileManager.default.removeItem(at: folder) }
        let journal = memoryJournal(in: folder)
        var generator = SeededGenerator(seed: UInt64(seed))
        let bytes = image(Self.size, seed: UInt8(seed))
        let stop = CopyStop()
        let cut = Int.random(in: 1...60, using: &generator)
        // A destination full of something else: a range recorded but not written would show.
        let destination = MemoryDestination(
            size: Self.size,
            initial: 0x55,
            stopAfter: seed.isMultiple(of: 2) ? (cut, stop) : nil,
            cancelAt: seed.isMultiple(of: 2) ? nil : cut
        )
        let firstResult: Result<CopyReport, any Error>
        do {
            firstResult = .success(
                try await copy(from: MemorySource(bytes), to: destination, options: options(journal: journal), stop: stop)
            )
        } catch {
            firstResult = .failure(error)
        }
        switch firstResult {
        case .success(let report): #expect(report.stopped)
        case .failure(let error): #expect(error is CancellationError)
        }
        let source = MemorySource(bytes)
        let second = try await copy(from: source, to: destination, options: options(blockHash: .default, journal: journal))
        #expect(!second.stopped && second.bytes == UInt64(Self.size))
        #expect(firstDifference(destination.bytes, bytes) == nil, "seed \(seed), first run \(firstResult)")
        #expect(second.blockHash == (try await checksum(of: MemorySource(bytes))), "a resumed copy's blkhash reads the source again")
        #expect(!FileManager.default.fileExists(atPath: journal.path) && !FileManager.default.fileExists(atPath: journal.path + ".lock"))
    }

    /// A copy whose own task is cancelled still records what it wrote: its last checkpoint's
    /// flush is not cancelled with it (an NBD destination's flush would fail at once).
    @Test func aCancelledCopyRecordsWhatItWrote() async throws {
        let folder = try temporaryFolder()
        defer { try? FileManager.default.removeItem(at: folder) }
        let journal = memoryJournal(in: folder)
        let bytes = image(Self.size, seed: 9)
        let memory = MemoryDestination(size: Self.size, initial: 0x55)
        let running = NIOLockedValueBox<Task<CopyReport, any Error>?>(nil)
        let destination = InterruptingDestination(memory, afterWrites: 8) {
            // The copy may get here before its starter has recorded the task.
            while running.withLockedValue({ $0 == nil }) { await Task.yield() }
            running.withLockedValue { $0?.cancel() }
        }
        let task = Task { try await copy(from: MemorySource(bytes), to: destination, options: options(journal: journal)) }
        running.withLockedValue { $0 = task }
        await #expect(throws: CancellationError.self) { _ = try await task.value }
        let data = try Data(contentsOf: URL(fileURLWithPath: journal.path))
        let done = (try JSONSerialization.jsonObject(with: data) as? [String: Any])?["done"] as? [[Int]]
        let recorded = done?.reduce(0) { $0 + $1[1] - $1[0] } ?? 0
        #expect(recorded > 0 && recorded < Self.size, "\(String(decoding: data, as: UTF8.self))")
        for range in done ?? [] { #expect(memory.bytes[range[0]..<range[1]] == bytes[range[0]..<range[1]]) }

        let second = try await copy(from: MemorySource(bytes), to: memory, options: options(journal: journal))
        #expect(second.resumedBytes == UInt64(recorded) && firstDifference(memory.bytes, bytes) == nil)
    }

    /// A cancelled copy whose destination does not answer its last flush gives up on it after
    /// the grace period: the journal keeps what earlier checkpoints recorded.
    @Test func aCancelledCopyWaitsForAFrozenFlushOnlyBriefly() async throws {
        let folder = try temporaryFolder()
        defer { try? FileManager.default.removeItem(at: folder) }
        let journal = memoryJournal(in: folder)
        let running = NIOLockedValueBox<Task<CopyReport, any Error>?>(nil)
        let destination = InterruptingDestination(MemoryDestination(size: Self.size), afterWrites: 8, flushFreezes: true) {
            while running.withLockedValue({ $0 == nil }) { await Task.yield() }
            running.withLockedValue { $0?.cancel() }
        }
        let task = Task { try await copy(from: MemorySource(image(Self.size)), to: destination, options: options(journal: journal)) }
        running.withLockedValue { $0 = task }
        let started = ContinuousClock.now
        await #expect(throws: CancellationError.self) { _ = try await task.value }
        // Well under the frozen flush's minute, with room for a loaded machine.
        #expect(ContinuousClock.now - started < .seconds(30))
        #expect(FileManager.default.fileExists(atPath: journal.path))
    }

    /// A journal with progress is never applied to a file that opening just created: what it
    /// records is not in it.
    @Test func aJournalIsNotAppliedToAFileCreatedAnew() async throws {
        let folder = try temporaryFolder()
        defer { try? FileManager.default.removeItem(at: folder) }
        let path = folder.appendingPathComponent("copy.raw").path
        let journal = CopyOptions.Journal(path: folder.appendingPathComponent("copy.journal").path, source: "pattern", destination: path)
        let stop = CopyStop()
        let file = try FileEndpoint.destination(path, size: UInt64(Self.size))
        let first = try await copy(
            from: .pattern(size: UInt64(Self.size)),
            to: InterruptingDestination(file, afterWrites: 8) { stop.request() },
            options: options(journal: journal),
            stop: stop
        )
        #expect(first.stopped)
        try FileManager.default.removeItem(atPath: path)
        await #expect {
            try await copy(
                from: .pattern(size: UInt64(Self.size)),
                to: try FileEndpoint.destination(path, size: UInt64(Self.size)),
                options: options(journal: journal)
            )
        } throws: { error in
            (error as? NBDCopyError)?.code == .journal && "\(error)".contains("created or extended")
        }
    }

    /// An incremental copy onto an existing file shorter than the source (the disk grew since
    /// the last backup) is refused, and the file is left as it was: not grown with zeroes for
    /// the next run to find "the right size".
    @Test func anIncrementalCopyOntoAShorterFileLeavesItAsItWas() async throws {
        let folder = try temporaryFolder()
        defer { try? FileManager.default.removeItem(at: folder) }
        let path = folder.appendingPathComponent("backup.raw").path
        let old = Data(image(Self.size / 2, seed: 3))
        try old.write(to: URL(fileURLWithPath: path))
        let source = BitmapSource(MemorySource(image(Self.size)), dirty: [0..<4096], size: UInt64(Self.size))
        await #expect {
            try await copy(from: source, to: try FileEndpoint.destination(path, size: UInt64(Self.size)), options: options())
        } throws: { error in
            (error as? NBDCopyError)?.code == .sizeMismatch
        }
        #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == old)
        // A full copy accepts it, and extends it first.
        _ = try await copy(from: MemorySource(image(Self.size)), to: try FileEndpoint.destination(path, size: UInt64(Self.size)))
        #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == Data(image(Self.size)))
    }

    /// A reader of the progress is woken at most once an interval, not once a piece: a copy
    /// does thousands a second.
    @Test func progressUpdatesComeAtMostOnceAnInterval() async throws {
        let progress = CopyProgress(total: 10_000)
        let reader = Task {
            var count = 0
            var last: CopyProgress.Snapshot?
            for await snapshot in progress.updates {
                count += 1
                last = snapshot
            }
            return (count, last)
        }
        let start = ContinuousClock.now
        for _ in 0..<10_000 {
            progress.add(1)
            await Task.yield()
        }
        progress.finish()
        let elapsed = ContinuousClock.now - start
        let (count, last) = await reader.value
        #expect(last?.finished == true && last?.done == 10_000)
        #expect(count <= Int(elapsed / CopyProgress.updateInterval) + 2, "\(count) updates in \(elapsed)")
    }

    /// Stops a copy of `source` with `journal` after a few writes: the journal then holds part
    /// of it.
    func stoppedCopy(from source: any CopySource, journal: CopyOptions.Journal) async throws -> MemoryDestination {
        let stop = CopyStop()
        let destination = MemoryDestination(size: Self.size, initial: 0x55, stopAfter: (4, stop))
        let report = try await copy(from: source, to: destination, options: options(journal: journal), stop: stop)
        #expect(report.stopped)
        let recorded = try #require(try journal.recorded())
        #expect(recorded.doneBytes > 0 && recorded.doneBytes < UInt64(Self.size))
        return destination
    }

    func expectRefused(_ journal: CopyOptions.Journal, from source: any CopySource, saying words: String) async {
        let refusal: (any Error) -> Bool = { error in
            guard let error = error as? NBDCopyError else { return false }
            return error.code == .journal && error.message.contains(words)
        }
        #expect(performing: { try journal.requireResumable(from: source) }, throws: refusal)
        await #expect(
            performing: { try await copy(from: source, to: MemoryDestination(size: Self.size), options: options(journal: journal)) },
            throws: refusal
        )
    }

    /// "A resumed copy must never silently mix two states of its source": a source that
    /// cannot show its state (as an export) resumes only under the state its caller named
    /// when the copy began.
    @Test func aResumeNeedsTheStateTheCopyBeganIn() async throws {
        let folder = try temporaryFolder()
        defer { try? FileManager.default.removeItem(at: folder) }
        let bytes = image(Self.size, seed: 21)
        var journal = CopyOptions.Journal(
            path: folder.appendingPathComponent("copy.journal").path,
            source: "memory",
            destination: "memory",
            sourceState: "snapshot-1"
        )
        let destination = try await stoppedCopy(from: MemorySource(bytes), journal: journal)
        #expect(try journal.recorded()?.sourceState == "snapshot-1")
        journal.sourceState = "snapshot-2"
        await expectRefused(journal, from: MemorySource(bytes), saying: "in the state snapshot-1, not snapshot-2")
        journal.sourceState = nil
        await expectRefused(journal, from: MemorySource(bytes), saying: "name that state again (nbd copy --source-state snapshot-1")
        journal.sourceState = "snapshot-1"
        let report = try await copy(from: MemorySource(bytes), to: destination, options: options(journal: journal))
        #expect(report.resumedBytes > 0 && firstDifference(destination.bytes, bytes) == nil)

        // Begun with no state named: nothing can show that the source did not change.
        journal.sourceState = nil
        _ = try await stoppedCopy(from: MemorySource(bytes), journal: journal)
        await expectRefused(journal, from: MemorySource(bytes), saying: "cannot tell whether memory is still in the state")
        journal.sourceState = "snapshot-1"
        await expectRefused(journal, from: MemorySource(bytes), saying: "cannot tell whether memory is still in the state")
    }

    /// A file source shows its own state: the same file resumes, and one written since (the
    /// same size, one byte changed) is refused.
    @Test func aFileSourceWrittenSinceTheJournalIsRefused() async throws {
        let folder = try temporaryFolder()
        defer { try? FileManager.default.removeItem(at: folder) }
        let path = folder.appendingPathComponent("source.raw").path
        var bytes = image(Self.size, seed: 22)
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        let journal = CopyOptions.Journal(path: folder.appendingPathComponent("copy.journal").path, source: path, destination: "m")
        var destination = try await stoppedCopy(from: try FileEndpoint.source(path), journal: journal)
        let report = try await copy(from: try FileEndpoint.source(path), to: destination, options: options(journal: journal))
        #expect(report.resumedBytes > 0 && firstDifference(destination.bytes, bytes) == nil, "an unchanged file resumes")

        destination = try await stoppedCopy(from: try FileEndpoint.source(path), journal: journal)
        let handle = try #require(FileHandle(forWritingAtPath: path))
        try handle.seek(toOffset: 0)
        bytes[0] ^= 0xFF
        try handle.write(contentsOf: Data(bytes.prefix(1)))
        try handle.close()
        await expectRefused(journal, from: try FileEndpoint.source(path), saying: "\(path) changed since the journal")
    }

    /// A caller that locked the journal before opening anything (as `nbd copy --resume` does)
    /// runs its copy under that lock; anyone else is refused until it lets go.
    @Test func aCopyGoesOnUnderItsCallersJournalLock() async throws {
        let folder = try temporaryFolder()
        defer { try? FileManager.default.removeItem(at: folder) }
        let bytes = image(Self.size, seed: 23)
        let journal = memoryJournal(in: folder)
        let lock = try journal.lock()
        #expect { try CopyJournalLock(journal: journal.path) } throws: {
            ($0 as? NBDCopyError)?.message.contains("another nbd copy") == true
        }
        let destination = MemoryDestination(size: Self.size)
        _ = try await copy(from: MemorySource(bytes), to: destination, options: options(journal: journal))
        #expect(firstDifference(destination.bytes, bytes) == nil)
        #expect(FileManager.default.fileExists(atPath: journal.path + ".lock"), "still the caller's")
        lock.release()
        #expect(!FileManager.default.fileExists(atPath: journal.path + ".lock"))
    }

    /// The journal of a copy between memory endpoints, whose source state the test names.
    func memoryJournal(in folder: URL) -> CopyOptions.Journal {
        let path = folder.appendingPathComponent("copy.journal").path
        return CopyOptions.Journal(path: path, source: "memory", destination: "memory", sourceState: "image")
    }

    func temporaryFolder() throws -> URL {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("copy-api-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        return folder
    }
}

/// A source whose bitmap calls everything clean but `dirty`, as an NBD source opened on a
/// dirty bitmap does.
final class BitmapSource: CopySource {
    let inner: MemorySource
    let dirty: [Range<UInt64>]
    let size: UInt64?

    init(_ inner: MemorySource, dirty: [Range<UInt64>], size: UInt64) {
        self.inner = inner
        self.dirty = dirty
        self.size = size
    }

    var hasCleanRanges: Bool { true }

    func cleanRanges(from offset: UInt64, length: UInt64) async throws -> [Range<UInt64>] {
        var clean: [Range<UInt64>] = []
        var position = offset
        for range in dirty where range.upperBound > offset {
            if range.lowerBound > position { clean.append(position..<min(range.lowerBound, offset + length)) }
            position = max(position, range.upperBound)
        }
        if position < offset + length { clean.append(position..<offset + length) }
        return clean.filter { !$0.isEmpty }
    }

    func read(into buffer: inout ByteBuffer, at offset: UInt64, length: Int, worker: Int) async throws {
        try await inner.read(into: &buffer, at: offset, length: length, worker: worker)
    }
}

/// `inner`, which calls `interrupt` after so many writes (to stop the copy, or cancel its
/// task); its flush fails in a cancelled task, as an NBD destination's does, and with
/// `flushFreezes` first waits a minute, or until cancelled.
struct InterruptingDestination: CopyDestination {
    let inner: any CopyDestination
    let afterWrites: Int
    let flushFreezes: Bool
    let interrupt: @Sendable () async -> Void
    private let writes = NIOLockedValueBox(0)

    init(
        _ inner: any CopyDestination,
        afterWrites: Int,
        flushFreezes: Bool = false,
        then interrupt: @escaping @Sendable () async -> Void
    ) {
        self.inner = inner
        self.afterWrites = afterWrites
        self.flushFreezes = flushFreezes
        self.interrupt = interrupt
    }

    var size: UInt64? { inner.size }
    var currentSize: UInt64? { inner.currentSize }
    var startsZeroed: Bool { inner.startsZeroed }
    var isSequential: Bool { inner.isSequential }

    func write(_ data: [ByteBuffer], at offset: UInt64, worker: Int) async throws {
        try await inner.write(data, at: offset, worker: worker)
        let count = writes.withLockedValue {
            $0 += 1
            return $0
        }
        if count == afterWrites { await interrupt() }
    }

    func zero(at offset: UInt64, length: UInt64, worker: Int) async throws {
        try await inner.zero(at: offset, length: length, worker: worker)
    }
    func prepare() async throws { try await inner.prepare() }
    func flush() async throws {
        // A flush that does not answer: time passes on purpose.
        if flushFreezes { try await Task.sleep(for: .seconds(60)) }
        try Task.checkCancellation()
        try await inner.flush()
    }
    func close() async { await inner.close() }
}
