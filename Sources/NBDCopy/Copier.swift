import Foundation
import NBD
import NBDCore
import NIOConcurrencyHelpers
import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The copy itself: workers take pieces in order from a shared cursor (so reads stay
/// sequential), skip what the source knows to be zero, and do not write blocks that read as zero.
package final class Copier: Sendable {
    package let source: any CopySource
    package let destination: any CopyDestination
    package let requestSize: UInt64
    package let workers: Int
    package let sparse: Int
    package let progress: CopyProgress
    /// What is read is hashed into this, when a blkhash was asked for.
    package let hasher: BlockHasher?
    /// How much of the source to copy, when not all of it.
    package let length: UInt64?
    /// Of a resumable copy: what was done already is skipped, what gets done is recorded.
    package let journal: CopyJournal?

    package init(
        source: any CopySource,
        destination: any CopyDestination,
        requestSize: UInt64,
        workers: Int,
        sparse: Int,
        progress: CopyProgress,
        hasher: BlockHasher? = nil,
        length: UInt64? = nil,
        journal: CopyJournal? = nil
    ) {
        self.source = source
        self.destination = destination
        self.requestSize = requestSize
        self.workers = workers
        self.sparse = sparse
        self.progress = progress
        self.hasher = hasher
        self.length = length
        self.journal = journal
    }

    /// What the workers' buffers may take at most, by default: with the rest of the process,
    /// about what nbdcopy takes for a copy between two exports.
    package static let defaultMemory: UInt64 = 24 << 20

    /// The request size raised to the endpoints' preferred request sizes, and one worker per
    /// request in flight over every connection of an export (`requests` per connection),
    /// as many as `memory` holds buffers of the request size (but one per connection at least)
    /// unless the destination discards what it gets.
    package convenience init(
        source: any CopySource,
        destination: any CopyDestination,
        requestSize: UInt64,
        requests: Int,
        memory: UInt64 = Copier.defaultMemory,
        sparse: Int,
        progress: CopyProgress,
        hasher: BlockHasher? = nil,
        length: UInt64? = nil,
        journal: CopyJournal? = nil
    ) {
        let remote = [source.connectionCount, destination.connectionCount].compactMap { $0 }
        let connections = remote.max() ?? 1
        let size = max(requestSize, source.preferredRequestSize ?? 0, destination.preferredRequestSize ?? 0)
        // Data that is only hashed or thrown away is held for no time: the memory bound is for
        // data that waits for its writes.
        var workers = destination.discards ? connections * requests : max(connections, min(connections * requests, Int(memory / size)))
        // Between local files, requests in flight only wait for the thread pool: two per
        // thread keep it busy, and fewer buffers stay warm in the processor's caches.
        if remote.isEmpty { workers = min(workers, 2 * System.coreCount) }
        self.init(
            source: source,
            destination: destination,
            requestSize: size,
            workers: workers,
            sparse: sparse,
            progress: progress,
            hasher: hasher,
            length: length,
            journal: journal
        )
    }

    /// Copies; returns how many bytes the source had.
    @discardableResult
    package func run(stop: CopyStop) async throws -> UInt64 {
        guard let size = length ?? source.size, !destination.isSequential else {
            return try await runSequentially(stop: stop)
        }
        let cursor = Cursor(source: source, size: size, pieceSize: requestSize, skipping: journal?.resumed ?? ByteRanges())
        try await withThrowingTaskGroup(of: Void.self) { group in
            for worker in 0..<workers {
                // On the source's event loop when it is an export: each read resumes where its reply
                // was read. On the destination's when the source's reads do not hold up the thread
                // (a file's run on a thread pool): each write is sent from where it is made. Not
                // for a pattern, whose making would hold up that loop's I/O, so that a dead
                // destination went unnoticed for seconds.
                let executor = source.taskExecutor(for: worker) ?? (source.readsOffThread ? destination.taskExecutor(for: worker) : nil)
                group.addTask(executorPreference: executor) {
                    // The worker's one buffer, read into again for each piece once the last
                    // piece's writes are done: the copy holds `workers` buffers, never more
                    // (SwiftNIO's receive buffers are not held: the data is read straight in).
                    var buffer = ByteBuffer()
                    // Cancelled once another worker failed: no more pieces are read for nothing.
                    while !stop.isRequested, !Task.isCancelled, let piece = try await cursor.next() {
                        try await self.copy(piece, worker: worker, buffer: &buffer)
                        self.journal?.completed(piece.range)
                    }
                }
            }
            // The first failure is the reason: the others are cancelled and their requests drain.
            do {
                try await group.waitForAll()
            } catch {
                group.cancelAll()
                while (try? await group.next()) != nil {}
                throw error
            }
        }
        return size
    }

    /// For a stream source or destination: one piece at a time, in order.
    private func runSequentially(stop: CopyStop) async throws -> UInt64 {
        var offset: UInt64 = 0
        while !stop.isRequested {
            let length = (self.length ?? source.size).map { min(requestSize, $0 - offset) } ?? requestSize
            guard length > 0 else { break }
            let data = CopyData([try await source.read(at: offset, length: Int(length), worker: 0)])
            guard data.count > 0 else { break }
            if let size = destination.size, offset + UInt64(data.count) > size {
                throw NBDCopyError(.sizeMismatch, "the source is larger than the destination (\(size) bytes)")
            }
            hasher?.add(data, at: offset)
            try await destination.write(data.buffers, at: offset, worker: 0)
            offset += UInt64(data.count)
            progress.add(UInt64(data.count))
            if data.count < Int(length) { break }
        }
        return offset
    }

    nonisolated(nonsending) private func copy(_ piece: Cursor.Piece, worker: Int, buffer: inout ByteBuffer) async throws {
        let range = piece.range
        switch piece.kind {
        case .clean:
            // Not dirty since the destination's copy was made, or copied by an earlier run
            // of a resumed copy: nothing to do.
            break
        case .zero:
            hasher?.addZeroes(at: range.lowerBound, length: UInt64(range.count))
            if !destination.startsZeroed {
                try await destination.zero(at: range.lowerBound, length: UInt64(range.count), worker: worker)
            }
        case .data:
            let data: CopyData
            if destination.discards,
                let segments = try await source.readSegments(at: range.lowerBound, length: range.count, worker: worker)
            {
                data = CopyData(segments)
            } else {
                buffer.clear()
                try await source.read(into: &buffer, at: range.lowerBound, length: range.count, worker: worker)
                data = CopyData([buffer])
            }
            guard data.count == range.count else {
                throw NBDCopyError(.incomplete, "short read from the source at offset \(range.lowerBound)")
            }
            hasher?.add(data, at: range.lowerBound)
            try await writeSparsely(data, at: range.lowerBound, worker: worker)
        }
        progress.add(UInt64(range.count), skipped: piece.kind == .clean)
    }

    /// Writes `data`, but zeroes (or, on a zeroed destination, skips) runs of all-zero blocks.
    nonisolated(nonsending) private func writeSparsely(_ data: CopyData, at offset: UInt64, worker: Int) async throws {
        guard sparse > 0, !destination.discards else {
            try await destination.write(data.buffers, at: offset, worker: worker)
            return
        }
        var runStart = 0
        var runIsZero: Bool?
        var index = 0
        func flushRun(to end: Int) async throws {
            guard let zero = runIsZero, end > runStart else { return }
            let position = offset + UInt64(runStart)
            if zero {
                if !destination.startsZeroed { try await destination.zero(at: position, length: UInt64(end - runStart), worker: worker) }
            } else {
                try await destination.write(data.slices(runStart..<end), at: position, worker: worker)
            }
        }
        while index < data.count {
            let end = min(data.count, index + sparse)
            let zero = data.isZero(index..<end)
            if zero != runIsZero {
                try await flushRun(to: index)
                runStart = index
                runIsZero = zero
            }
            index = end
        }
        try await flushRun(to: data.count)
    }
}

/// Hands out pieces in order, with the source's zero areas looked up once per large window.
/// A lock, not an actor: workers run on their connections' threads, and a hop to an actor and
/// back for every piece would cost more than the piece's bookkeeping.
package final class Cursor: Sendable {
    /// What a part of the source needs: reading, zeroing, or nothing (clean in the bitmap).
    package enum Kind: Sendable { case data, zero, clean }

    /// One area to copy: data, or a whole zero or clean area, however large.
    package struct Piece: Sendable {
        package var range: Range<UInt64>
        package var kind: Kind
    }

    /// The zero and clean areas of a window, in order, not overlapping.
    package typealias Areas = [(range: Range<UInt64>, kind: Kind)]

    private struct State {
        var position: UInt64 = 0
        var window: Range<UInt64> = 0..<0
        var areas: Areas = []
        var areaIndex = 0
        /// The block status lookup under way, shared by the workers that need it.
        var fetching: (start: UInt64, task: Task<Areas, any Error>)?
    }

    private enum Step {
        case piece(Piece?)
        case wait(start: UInt64, Task<Areas, any Error>)
    }

    private let source: any CopySource
    private let size: UInt64
    private let pieceSize: UInt64
    /// Copied already (by an earlier run of a resumed copy): treated as clean.
    private let skipping: ByteRanges
    private let state = NIOLockedValueBox(State())
    /// Block status is asked for this much at a time.
    package static let windowSize: UInt64 = 1 << 30

    package init(source: any CopySource, size: UInt64, pieceSize: UInt64, skipping: ByteRanges = ByteRanges()) {
        self.source = source
        self.size = size
        self.pieceSize = pieceSize
        self.skipping = skipping
    }

    nonisolated(nonsending) package func next() async throws -> Piece? {
        while true {
            switch state.withLockedValue({ step(&$0) }) {
            case .piece(let piece):
                return piece
            case .wait(let start, let task):
                let fetched = try await task.value
                // Another worker may have installed this window, or moved past it, meanwhile.
                state.withLockedValue { state in
                    guard state.position >= start, state.position < min(size, start + Self.windowSize),
                        !state.window.contains(state.position)
                    else { return }
                    state.areas = fetched
                    state.areaIndex = 0
                    state.window = start..<min(size, start + Self.windowSize)
                    state.fetching = nil
                }
            }
        }
    }

    private func step(_ state: inout State) -> Step {
        guard state.position < size else { return .piece(nil) }
        guard state.window.contains(state.position) else {
            let start = state.position
            if let fetching = state.fetching, fetching.start == start { return .wait(start: start, fetching.task) }
            let source = self.source
            let length = min(size, start + Self.windowSize) - start
            let skipping = self.skipping
            let task = Task { try await Self.areas(of: source, from: start, length: length, skipping: skipping) }
            state.fetching = (start, task)
            return .wait(start: start, task)
        }
        // `position` only grows: drop the areas behind it, so each piece costs O(1).
        while state.areaIndex < state.areas.count, state.areas[state.areaIndex].range.upperBound <= state.position {
            state.areaIndex += 1
        }
        let nextArea = state.areaIndex < state.areas.count ? state.areas[state.areaIndex] : nil
        // A whole zero or clean area is one piece, however large: nothing is read for it.
        if let area = nextArea, area.range.contains(state.position) {
            let piece = Piece(range: state.position..<area.range.upperBound, kind: area.kind)
            state.position = area.range.upperBound
            return .piece(piece)
        }
        var end = min(state.window.upperBound, state.position + pieceSize)
        if let area = nextArea, area.range.lowerBound < end { end = area.range.lowerBound }
        let piece = Piece(range: state.position..<end, kind: .data)
        state.position = end
        return .piece(piece)
    }

    /// The source's clean ranges (and those `skipping` holds), and its zero ranges outside
    /// them, in order.
    package static func areas(
        of source: any CopySource,
        from start: UInt64,
        length: UInt64,
        skipping: ByteRanges = ByteRanges()
    ) async throws -> Areas {
        var cleanRanges = skipping
        for range in try await source.cleanRanges(from: start, length: length) { cleanRanges.insert(range) }
        let clean = cleanRanges.clamped(to: start..<(start + length))
        let zeroes = try await source.zeroRanges(from: start, length: length)
        // Without a bitmap, as block status gave them: a zero area running past the window is
        // one piece, and the next window starts after it (a sparse terabyte is not a thousand
        // lookups).
        guard !clean.isEmpty else { return zeroes.map { ($0, .zero) } }
        // Where the bitmap says clean nothing is copied, zero or not: zero areas count only
        // where it is dirty. Both lists are in order, so one pass cuts them.
        let window = start..<(start + length)
        var areas: Areas = clean.map { $0.clamped(to: window) }.filter { !$0.isEmpty }.map { ($0, .clean) }
        let dirty = complement(of: areas.map(\.range), in: window)
        var first = 0
        for zero in zeroes {
            while first < dirty.count, dirty[first].upperBound <= zero.lowerBound { first += 1 }
            var index = first
            while index < dirty.count, dirty[index].lowerBound < zero.upperBound {
                let cut = zero.clamped(to: dirty[index])
                if !cut.isEmpty { areas.append((cut, .zero)) }
                index += 1
            }
        }
        return areas.sorted { $0.range.lowerBound < $1.range.lowerBound }
    }

    /// What `ranges` (in order, not overlapping) leave of `window`.
    package static func complement(of ranges: [Range<UInt64>], in window: Range<UInt64>) -> [Range<UInt64>] {
        var gaps: [Range<UInt64>] = []
        var position = window.lowerBound
        for range in ranges {
            if range.lowerBound > position { gaps.append(position..<range.lowerBound) }
            position = max(position, range.upperBound)
        }
        if position < window.upperBound { gaps.append(position..<window.upperBound) }
        return gaps
    }
}
