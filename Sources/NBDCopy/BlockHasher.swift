import NIOConcurrencyHelpers

/// The blkhash of an image (see ``BlockHashSpecification``), fed by many workers at once, each
/// range of the image exactly once, in any order.
///
/// A worker hashes the whole blocks of what it read itself, outside the lock; zero blocks (known
/// from block status, or read as zeroes) take the one precomputed digest. The lock only files
/// digests away and folds, in order, those whose predecessors are all in: memory holds the
/// digests of blocks ahead of the oldest piece still in flight, never one per block of the image
/// (a terabyte of 64 KiB blocks would be 512 MiB of SHA-256 digests). Blocks cut by a piece's
/// edge are gathered in a buffer of one block until their last byte comes.
package final class BlockHasher: Sendable {
    package let specification: BlockHashSpecification
    private let zeroDigest: [UInt8]
    /// The zero digest this many times over, so that a long run of zero blocks is folded in a
    /// few large updates rather than one per block.
    private let zeroDigests: [UInt8]
    private static let zeroBatch = 1024

    /// Consecutive blocks' digests, filed by their first block.
    private enum Run {
        case digests([UInt8], count: UInt64)
        case zeroes(count: UInt64)
    }

    private struct Partial {
        var bytes: [UInt8]
        var filled = 0
    }

    private struct State {
        var whole: IncrementalHash
        /// The first block not folded yet.
        var next: UInt64 = 0
        var runs: [UInt64: Run] = [:]
        var partials: [UInt64: Partial] = [:]
        /// The digest of each region's block digests so far, and of the region being folded.
        var regions: [[UInt8]] = []
        var region: IncrementalHash
    }

    /// Blocks per region: 16 MiB of image, whose digests are kept (``BlockHash/regions``).
    package let regionBlocks: UInt64
    /// The region digest of a region of zero blocks.
    private let zeroRegionDigest: [UInt8]

    private let state: NIOLockedValueBox<State>

    package init(_ specification: BlockHashSpecification) {
        self.specification = specification
        zeroDigest = [UInt8](repeating: 0, count: specification.blockSize).withUnsafeBytes { specification.digest($0) }
        zeroDigests = Array([[UInt8]](repeating: zeroDigest, count: Self.zeroBatch).joined())
        regionBlocks = UInt64(max(1, (16 << 20) / specification.blockSize))
        var region = IncrementalHash(specification.algorithm)
        for _ in 0..<regionBlocks { region.update(zeroDigest) }
        zeroRegionDigest = region.finalize()
        state = NIOLockedValueBox(
            State(whole: IncrementalHash(specification.algorithm), region: IncrementalHash(specification.algorithm))
        )
    }

    private var blockSize: UInt64 { UInt64(specification.blockSize) }

    /// The bytes read at `offset`.
    package func add(_ data: CopyData, at offset: UInt64) {
        forEachBlock(of: offset..<(offset + UInt64(data.count))) { block, range, isWhole in
            let local = Int(range.lowerBound - offset)..<Int(range.upperBound - offset)
            if isWhole {
                return data.isZero(local) ? nil : digest(of: data, local)
            }
            return fill(block, at: Int(range.lowerBound - block * blockSize), count: range.count) { partial, start in
                data.withBytes(of: local) { bytes in
                    partial.withUnsafeMutableBytes {
                        ($0.baseAddress! + start).copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
                    }
                    start += bytes.count
                }
            }
        }
    }

    /// A range of the image that reads as zeroes: its whole blocks are one run, filed at once
    /// (a terabyte of zeroes is not walked block by block), the blocks it cuts are filled.
    package func addZeroes(at offset: UInt64, length: UInt64) {
        let end = offset + length
        let firstWhole = min(end, (offset + blockSize - 1) / blockSize * blockSize)
        let lastWhole = max(firstWhole, end / blockSize * blockSize)
        func fillCut(_ block: UInt64, _ range: Range<UInt64>, _ isWhole: Bool) -> BlockDigest? {
            // A new partial block is zeroes already.
            fill(block, at: Int(range.lowerBound - block * blockSize), count: range.count) { _, _ in }
        }
        forEachBlock(of: offset..<firstWhole, fillCut)
        if lastWhole > firstWhole {
            state.withLockedValue { file(.zeroes(count: (lastWhole - firstWhole) / blockSize), at: firstWhole / blockSize, in: &$0) }
        }
        forEachBlock(of: lastWhole..<end, fillCut)
    }

    /// The blkhash, once every byte of an image of `size` bytes was added; the last block is
    /// whatever is left of the image, hashed at its own length.
    package func finish(size: UInt64) throws -> BlockHash {
        try state.withLockedValue { state in
            let blocks = (size + blockSize - 1) / blockSize
            if size % blockSize != 0, let last = state.partials.removeValue(forKey: blocks - 1),
                UInt64(last.filled) == size % blockSize
            {
                let digest = last.bytes[0..<last.filled].withUnsafeBytes { specification.digest($0) }
                file(.digests(digest, count: 1), at: blocks - 1, in: &state)
            }
            guard state.next == blocks, state.runs.isEmpty, state.partials.isEmpty else {
                throw NBDCopyError(.incomplete, "the blkhash misses blocks of the image: not every byte was read")
            }
            if state.next % regionBlocks != 0 {
                state.regions.append(state.region.finalize())
            }
            var sizeField = size.littleEndian
            withUnsafeBytes(of: &sizeField) { state.whole.update($0) }
            return BlockHash(specification: specification, size: size, digest: state.whole.finalize(), regions: state.regions)
        }
    }

    // MARK: Blocks

    /// Calls `body` for each block that `range` touches, with the part of `range` in it and
    /// whether that part is the whole block; `body` answers with the digest of a whole block
    /// (nil for zeroes), or with what became of a partial one.
    private func forEachBlock(of range: Range<UInt64>, _ body: (UInt64, Range<UInt64>, Bool) -> BlockDigest?) {
        var position = range.lowerBound
        var first: UInt64?
        var digests: [UInt8] = []
        var zeroes: UInt64 = 0
        // Whole blocks are filed together, one run per piece, under one lock.
        func fileWhole() {
            guard let start = first else { return }
            let count = zeroes > 0 ? zeroes : UInt64(digests.count / zeroDigest.count)
            state.withLockedValue { file(zeroes > 0 ? .zeroes(count: count) : .digests(digests, count: count), at: start, in: &$0) }
            first = nil
            digests = []
            zeroes = 0
        }
        while position < range.upperBound {
            let block = position / blockSize
            let end = min(range.upperBound, (block + 1) * blockSize)
            let isWhole = position == block * blockSize && end == (block + 1) * blockSize
            switch body(block, position..<end, isWhole) {
            case .some(.digest(let digest)) where isWhole:
                if zeroes > 0 { fileWhole() }
                if first == nil { first = block }
                digests += digest
            case .none where isWhole:
                if !digests.isEmpty { fileWhole() }
                if first == nil { first = block }
                zeroes += 1
            case .some(.completed(let block, let digest)):
                state.withLockedValue { file(.digests(digest, count: 1), at: block, in: &$0) }
            default:
                break
            }
            position = end
        }
        fileWhole()
    }

    /// What is known of a block after a range of it was added.
    private enum BlockDigest {
        /// A whole block's digest.
        case digest([UInt8])
        /// A partial block that this range completed.
        case completed(UInt64, [UInt8])
        /// A partial block still waiting for bytes.
        case waiting
    }

    private func digest(of data: CopyData, _ range: Range<Int>) -> BlockDigest {
        var hash = IncrementalHash(specification.algorithm)
        data.withBytes(of: range) { hash.update($0) }
        return .digest(hash.finalize())
    }

    /// Adds `count` bytes at `start` of a partial block, written by `copy` (which advances
    /// its second argument); hashes the block when that was its last byte.
    private func fill(_ block: UInt64, at start: Int, count: Int, _ copy: (inout [UInt8], inout Int) -> Void) -> BlockDigest {
        let complete: [UInt8]? = state.withLockedValue { state in
            var partial = state.partials.removeValue(forKey: block) ?? Partial(bytes: [UInt8](repeating: 0, count: specification.blockSize))
            var position = start
            copy(&partial.bytes, &position)
            partial.filled += count
            guard partial.filled == specification.blockSize else {
                state.partials[block] = partial
                return nil
            }
            return partial.bytes
        }
        guard let complete else { return .waiting }
        let digest = complete.withUnsafeBytes { CopyData.isZero($0) ? zeroDigest : specification.digest($0) }
        return .completed(block, digest)
    }

    /// Files a run and folds every run that is now next in order.
    private func file(_ run: Run, at block: UInt64, in state: inout State) {
        state.runs[block] = run
        while let next = state.runs.removeValue(forKey: state.next) {
            switch next {
            case .digests(let digests, let count):
                state.whole.update(digests)
                digests.withUnsafeBytes { fold($0, count: count, in: &state) }
            case .zeroes(let count):
                var left = count
                while left > 0 {
                    let inRegion = state.next % regionBlocks
                    if inRegion == 0, left >= regionBlocks {
                        // A whole region of zeroes: its region digest is known.
                        var whole = regionBlocks
                        while whole > 0 {
                            let batch = Int(min(whole, UInt64(Self.zeroBatch)))
                            zeroDigests[0..<(batch * zeroDigest.count)].withUnsafeBytes { state.whole.update($0) }
                            whole -= UInt64(batch)
                        }
                        state.regions.append(zeroRegionDigest)
                        state.next += regionBlocks
                        left -= regionBlocks
                        continue
                    }
                    let batch = min(left, regionBlocks - inRegion, UInt64(Self.zeroBatch))
                    zeroDigests[0..<(Int(batch) * zeroDigest.count)].withUnsafeBytes { bytes in
                        state.whole.update(bytes)
                        fold(bytes, count: batch, in: &state)
                    }
                    left -= batch
                }
            }
        }
    }

    /// Adds `count` consecutive block digests, from the next block on, to the region digests.
    private func fold(_ digests: UnsafeRawBufferPointer, count: UInt64, in state: inout State) {
        let length = zeroDigest.count
        var done: UInt64 = 0
        while done < count {
            let taken = min(count - done, regionBlocks - state.next % regionBlocks)
            state.region.update(UnsafeRawBufferPointer(rebasing: digests[(Int(done) * length)..<(Int(done + taken) * length)]))
            done += taken
            state.next += taken
            if state.next % regionBlocks == 0 {
                state.regions.append(state.region.finalize())
                state.region = IncrementalHash(specification.algorithm)
            }
        }
    }
}

extension BlockHasher {
    /// Reads `source` (its first `length` bytes, or all of it) and hashes it; nil when `stop`
    /// ended the reading first.
    package static func reading(
        _ source: any CopySource,
        as specification: BlockHashSpecification,
        length: UInt64? = nil,
        options: CopyOptions,
        progress: CopyProgress = CopyProgress(total: nil),
        stop: CopyStop
    ) async throws -> BlockHash? {
        let hash = BlockHasher(specification)
        let reader = Copier(
            source: source,
            destination: NullDestination(),
            requestSize: options.requestSize,
            requests: options.requests,
            memory: options.memory,
            sparse: 0,
            progress: progress,
            hasher: hash,
            length: length
        )
        let size = try await reader.run(stop: stop)
        return stop.isRequested ? nil : try hash.finish(size: size)
    }
}
