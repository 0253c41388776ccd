#if canImport(Glibc)
import Glibc
#endif
import Foundation
import NBD
import NIOCore

/// The copy itself: workers take pieces in order from a shared cursor (so reads stay
/// sequential), skip what the source knows to be zero, and do not write blocks that read as zero.
final class Copier: Sendable {
    let source: any CopySource
    let destination: any CopyDestination
    let requestSize: UInt64
    let workers: Int
    let sparse: Int
    let progress: Progress

    init(source: any CopySource, destination: any CopyDestination, requestSize: UInt64, workers: Int, sparse: Int, progress: Progress) {
        self.source = source
        self.destination = destination
        self.requestSize = requestSize
        self.workers = workers
        self.sparse = sparse
        self.progress = progress
    }

    func run(interrupt: Interrupt) async throws {
        guard let size = source.size, !destination.isSequential else {
            try await runSequentially(interrupt: interrupt)
            return
        }
        let cursor = Cursor(source: source, size: size, pieceSize: requestSize)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for worker in 0..<workers {
                group.addTask {
                    while !interrupt.happened, let piece = try await cursor.next() {
                        try await self.copy(piece, worker: worker)
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
    }

    /// For a stream source or destination: one piece at a time, in order.
    private func runSequentially(interrupt: Interrupt) async throws {
        var offset: UInt64 = 0
        while !interrupt.happened {
            let length = source.size.map { min(requestSize, $0 - offset) } ?? requestSize
            guard length > 0 else { break }
            let data = try await source.read(at: offset, length: Int(length), worker: 0)
            guard data.readableBytes > 0 else { break }
            if let size = destination.size, offset + UInt64(data.readableBytes) > size {
                throw CommandError("the source is larger than the destination (\(size) bytes)")
            }
            try await destination.write(data, at: offset, worker: 0)
            offset += UInt64(data.readableBytes)
            progress.add(UInt64(data.readableBytes))
            if data.readableBytes < Int(length) { break }
        }
    }

    private func copy(_ piece: Cursor.Piece, worker: Int) async throws {
        for part in piece.parts {
            if part.isZero {
                if !destination.startsZeroed { try await destination.zero(at: part.range.lowerBound, length: UInt64(part.range.count), worker: worker) }
            } else {
                let data = try await source.read(at: part.range.lowerBound, length: part.range.count, worker: worker)
                guard data.readableBytes == part.range.count else {
                    throw CommandError("short read from the source at offset \(part.range.lowerBound)")
                }
                try await writeSparsely(data, at: part.range.lowerBound, worker: worker)
            }
            progress.add(UInt64(part.range.count))
        }
    }

    /// Writes `data`, but zeroes (or, on a zeroed destination, skips) runs of all-zero blocks.
    private func writeSparsely(_ data: ByteBuffer, at offset: UInt64, worker: Int) async throws {
        guard sparse > 0, !destination.discards else {
            try await destination.write(data, at: offset, worker: worker)
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
                try await destination.write(data.getSlice(at: data.readerIndex + runStart, length: end - runStart)!, at: position, worker: worker)
            }
        }
        while index < data.readableBytes {
            let end = min(data.readableBytes, index + sparse)
            let zero = Self.isZero(data, from: index, to: end)
            if zero != runIsZero {
                try await flushRun(to: index)
                runStart = index
                runIsZero = zero
            }
            index = end
        }
        try await flushRun(to: data.readableBytes)
    }
}

extension Copier {
    /// A page of zeroes to compare against with memcmp, which is fast in any build.
    private static let zeroPage = [UInt8](repeating: 0, count: 65536)

    static func isZero(_ data: ByteBuffer, from start: Int, to end: Int) -> Bool {
        data.withUnsafeReadableBytes { bytes in
            var position = start
            while position < end {
                let count = min(end - position, zeroPage.count)
                let same = zeroPage.withUnsafeBytes { memcmp(bytes.baseAddress! + position, $0.baseAddress!, count) == 0 }
                guard same else { return false }
                position += count
            }
            return true
        }
    }
}

/// Hands out pieces in order, with the source's zero areas looked up once per large window.
actor Cursor {
    struct Piece: Sendable {
        var parts: [(range: Range<UInt64>, isZero: Bool)]
    }

    private let source: any CopySource
    private let size: UInt64
    private let pieceSize: UInt64
    private var position: UInt64 = 0
    private var window: Range<UInt64> = 0..<0
    private var zeroes: [Range<UInt64>] = []
    private var zeroIndex = 0
    private var fetching: (start: UInt64, task: Task<[Range<UInt64>], any Error>)?
    /// Block status is asked for this much at a time.
    private static let windowSize: UInt64 = 1 << 30

    init(source: any CopySource, size: UInt64, pieceSize: UInt64) {
        self.source = source
        self.size = size
        self.pieceSize = pieceSize
    }

    func next() async throws -> Piece? {
        // An actor is reentrant across `await`: another worker may move `position` while this one
        // waits for block status, so the answer is kept only if it still describes `position`.
        // Workers arriving meanwhile wait for the same answer instead of asking again.
        while position < size, !window.contains(position) {
            let start = position
            let end = min(size, start + Self.windowSize)
            let task: Task<[Range<UInt64>], any Error>
            if let fetching, fetching.start == start {
                task = fetching.task
            } else {
                let source = self.source
                task = Task { try await source.zeroRanges(from: start, length: end - start) }
                fetching = (start, task)
            }
            let fetched = try await task.value
            if position == start, !window.contains(position) {
                zeroes = fetched
                zeroIndex = 0
                window = start..<end
                fetching = nil
            }
        }
        guard position < size else { return nil }
        // `position` only grows: drop the zero areas behind it, so each piece costs O(1).
        while zeroIndex < zeroes.count, zeroes[zeroIndex].upperBound <= position { zeroIndex += 1 }
        let nextZero = zeroIndex < zeroes.count ? zeroes[zeroIndex] : nil
        // A whole zero area is one piece, however large: nothing is read for it.
        if let zero = nextZero, zero.contains(position) {
            let piece = Piece(parts: [(position..<zero.upperBound, true)])
            position = zero.upperBound
            return piece
        }
        var end = min(window.upperBound, position + pieceSize)
        if let zero = nextZero, zero.lowerBound < end { end = zero.lowerBound }
        let piece = Piece(parts: [(position..<end, false)])
        position = end
        return piece
    }
}
