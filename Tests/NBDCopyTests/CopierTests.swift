import Foundation
import NBDCopy
import NIOCore
import Testing

/// The copier between endpoints in memory: what it copies, what it skips, what it zeroes, how
/// it fails, and how a stopped copy resumes from its journal to the same bytes.
@Suite("Copier")
struct CopierTests {
    static let size = 8 << 20

    func copier(
        _ source: any CopySource,
        _ destination: any CopyDestination,
        requestSize: UInt64 = 64 << 10,
        sparse: Int = 4096,
        journal: CopyJournal? = nil
    ) -> Copier {
        Copier(
            source: source,
            destination: destination,
            requestSize: requestSize,
            requests: 8,
            sparse: sparse,
            progress: CopyProgress(total: source.size),
            journal: journal
        )
    }

    @Test func copiesEveryByteAndSkipsKnownZeroes() async throws {
        var bytes = image(Self.size)
        // A known zero range (not read), and zeroes in the data (found by looking).
        let known = UInt64(1 << 20)..<UInt64(3 << 20)
        for index in Int(known.lowerBound)..<Int(known.upperBound) { bytes[index] = 0 }
        for index in (5 << 20)..<((5 << 20) + 65536) { bytes[index] = 0 }
        let source = MemorySource(bytes, zeroes: [known])
        // A destination full of data: what reads as zero in the source must be zeroed there.
        let destination = MemoryDestination(size: Self.size, initial: 0xEE)
        let copied = try await copier(source, destination).run(stop: CopyStop())
        #expect(copied == UInt64(Self.size))
        #expect(firstDifference(destination.bytes, bytes) == nil)
        // 8 MiB in 64 KiB pieces is 128 reads; the 2 MiB known to be zero are 32 fewer.
        #expect(source.reads == 128 - 32)
    }

    @Test func aZeroedDestinationGetsNoZeroes() async throws {
        let bytes = [UInt8](repeating: 0, count: Self.size)
        let destination = MemoryDestination(size: Self.size)
        try await copier(MemorySource(bytes), destination).run(stop: CopyStop())
        #expect(destination.writes == 0, "all-zero data on a zeroed destination is not written")
        #expect(firstDifference(destination.bytes, bytes) == nil)
    }

    @Test func aFailedReadOrWriteFailsTheCopyWithItsError() async throws {
        let bytes = image(Self.size)
        for failing in [UInt64(0), UInt64(Self.size / 2), UInt64(Self.size - 1)] {
            await #expect {
                try await copier(MemorySource(bytes, failingAt: failing), MemoryDestination(size: Self.size)).run(stop: CopyStop())
            } throws: { error in
                (error as? NBDCopyError)?.message == "injected read failure at \(failing / (64 << 10) * (64 << 10))"
            }
            await #expect {
                try await copier(MemorySource(bytes), MemoryDestination(size: Self.size, failingAt: failing)).run(stop: CopyStop())
            } throws: { error in
                (error as? NBDCopyError)?.message.hasPrefix("injected write failure") == true
            }
        }
    }

    @Test func aLargerSourceIsRefused() async throws {
        // A sequential (stream) copy learns the sizes as it goes.
        final class Stream: CopySource {
            var size: UInt64? { nil }
            var readsOffThread: Bool { false }
            func read(into buffer: inout ByteBuffer, at offset: UInt64, length: Int, worker: Int) async throws {
                if offset < 3 << 20 { buffer.writeRepeatingByte(1, count: length) }
            }
        }
        await #expect {
            try await copier(Stream(), MemoryDestination(size: 2 << 20)).run(stop: CopyStop())
        } throws: { error in
            (error as? NBDCopyError)?.code == .sizeMismatch
        }
    }

    @Test func cancellationEndsTheCopyAtAnyPoint() async throws {
        let bytes = image(Self.size)
        for delay in [0, 1, 3, 10] {
            let destination = MemoryDestination(size: Self.size)
            let task = Task { try await copier(MemorySource(bytes), destination).run(stop: CopyStop()) }
            // A pause on purpose: the cancel comes at a different point of the copy each time.
            try await Task.sleep(for: .milliseconds(delay))
            task.cancel()
            // Ends, one way or the other: cancelled, or done before the cancel came.
            let result = await task.result
            if case .success(let copied) = result { #expect(copied == UInt64(Self.size)) }
        }
    }

    /// Stopped after a few writes, then resumed from the journal: the destination ends as
    /// the source, and the second run does not read what the first recorded.
    @Test(arguments: [1, 7, 40])
    func aStoppedCopyResumesFromItsJournal(stopAfter: Int) async throws {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("journal-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: folder) }
        let path = folder.appendingPathComponent("copy.journal").path
        let bytes = image(Self.size, seed: 3)
        let subject = CopyJournal.Subject(
            source: "memory",
            sourceSize: UInt64(Self.size),
            destination: "memory",
            destinationSize: UInt64(Self.size),
            bitmap: nil,
            sourceState: "image"
        )
        let stop = CopyStop()
        let destination = MemoryDestination(size: Self.size, initial: 0x55, stopAfter: (stopAfter, stop))
        let first = try CopyJournal.startOrResume(path, record: nil, subject: subject, destinationStartsZeroed: false)
        let firstRun = copier(MemorySource(bytes), destination, journal: first)
        _ = try await first.checkpointing(flushing: destination) { try await firstRun.run(stop: stop) }
        try await first.checkpoint(flushing: destination)
        #expect(stop.isRequested)
        #expect(firstDifference(destination.bytes, bytes) != nil, "the first run stopped early")

        let record = try #require(try CopyJournal.load(path))
        let done = try #require(CopyJournal.done(of: record))
        #expect(done.byteCount > 0 && done.byteCount < UInt64(Self.size))
        // What the journal calls done is the source's bytes in the destination.
        let copied = destination.bytes
        for range in done.ranges {
            let part = Int(range.lowerBound)..<Int(range.upperBound)
            #expect(firstDifference(copied[part], bytes[part]) == nil)
        }
        let second = try CopyJournal.startOrResume(path, record: record, subject: subject, destinationStartsZeroed: false)
        let source = MemorySource(bytes)
        let secondRun = copier(source, destination, journal: second)
        _ = try await second.checkpointing(flushing: destination) { try await secondRun.run(stop: CopyStop()) }
        #expect(firstDifference(destination.bytes, bytes) == nil)
        #expect(source.reads == Self.size / (64 << 10) - Int(done.byteCount / (64 << 10)))
    }

    @Test func progressCountsEveryByteOnce() async throws {
        let bytes = image(Self.size)
        let progress = CopyProgress(total: UInt64(Self.size))
        let run = Copier(
            source: MemorySource(bytes, zeroes: [0..<(1 << 20)]),
            destination: MemoryDestination(size: Self.size),
            requestSize: 64 << 10,
            requests: 8,
            sparse: 4096,
            progress: progress
        )
        let watcher = Task {
            var last: CopyProgress.Snapshot?
            for await snapshot in progress.updates { last = snapshot }
            return last
        }
        try await run.run(stop: CopyStop())
        progress.finish()
        let last = try #require(await watcher.value)
        #expect(last.finished && last.done == UInt64(Self.size) && last.skipped == 0 && last.percent == 100)
    }
}
