@_spi(NBDMachines) import NBDCore
import NIOCore

/// The writes, write-zeroes and trims a server answered since the last flush that covers them.
///
/// An answer is not durability: "All write commands ... that the server completes (i.e.
/// replies to) prior to processing a `NBD_CMD_FLUSH` MUST be written to non-volatile storage
/// prior to replying to that `NBD_CMD_FLUSH`", and only then. A server that restarts before
/// that flush may have lost them (a write-back cache, a host that crashed), and a flush sent to
/// the new server covers only what it received. So the pool keeps them, from the callers' own
/// buffers, until a flush answered covers them, and sends them again after a reconnection.
///
/// Within ``window`` bytes of write data; a window of zero keeps only where the writes went,
/// to say which ranges are in doubt after a reconnection.
struct ReplayLog: Sendable {
    /// What was answered.
    enum Operation: Sendable {
        case write([ByteBuffer], flags: CommandFlags)
        case writeZeroes(flags: CommandFlags)
        case trim
    }

    struct Entry: Sendable {
        /// The order of the answer: 1, 2, 3, ...
        var sequence: Int
        var offset: UInt64
        var length: UInt64
        /// Nil when the window is off: only the range is known.
        var operation: Operation?

        var range: Range<UInt64> { offset..<(offset + length) }

        /// The write data it holds.
        var dataBytes: Int {
            guard case .write(let data, _) = operation else { return 0 }
            return data.reduce(0) { $0 + $1.readableBytes }
        }
    }

    /// Bytes of write data kept at most before a flush is due; zero keeps none.
    let window: Int
    /// Entries kept at most with the window off; older ones are folded into ``folded``.
    let maximumEntries: Int
    private(set) var entries: [Entry] = []
    /// Write data held.
    private(set) var bytes = 0
    /// The sequence number of the last answer recorded (0 before any).
    private(set) var lastSequence = 0
    /// With the window off, ranges of entries folded together to bound the memory, and the
    /// last sequence among them.
    private var folded = ByteRanges()
    private var foldedThrough = 0

    init(window: Int, maximumEntries: Int = 65_536) {
        self.window = max(0, window)
        self.maximumEntries = maximumEntries
    }

    var isEmpty: Bool { entries.isEmpty && folded.ranges.isEmpty }

    /// Records an answer; true when the data held is now past the window, and a flush is due.
    mutating func answered(_ operation: Operation, offset: UInt64, length: UInt64) -> Bool {
        guard length > 0 else { return false }
        lastSequence += 1
        var kept: Operation? = operation
        if window == 0 {
            kept = nil
        }
        let entry = Entry(sequence: lastSequence, offset: offset, length: length, operation: kept)
        bytes += entry.dataBytes
        entries.append(entry)
        if window == 0, entries.count > maximumEntries { fold() }
        return window > 0 && bytes > window
    }

    /// A flush was answered that was sent after answer `sequence`: what came before is durable.
    mutating func flushed(through sequence: Int) {
        let covered = entries.prefix { $0.sequence <= sequence }
        bytes -= covered.reduce(0) { $0 + $1.dataBytes }
        entries.removeFirst(covered.count)
        if foldedThrough <= sequence { folded = ByteRanges() }
    }

    /// The export shrank to `size`: what was answered past it is gone with the bytes, and must
    /// not be sent again (a server refuses a write past the end, and a replay refused ends
    /// the client). Entries are cut at the end, or dropped when wholly past it.
    mutating func clip(to size: UInt64) {
        var clipped: [Entry] = []
        for var entry in entries where entry.offset < size {
            if entry.range.upperBound > size {
                entry.length = size - entry.offset
                if case .write(let data, let flags) = entry.operation {
                    var left = Int(entry.length)
                    var kept: [ByteBuffer] = []
                    for buffer in data where left > 0 {
                        kept.append(buffer.getSlice(at: buffer.readerIndex, length: min(left, buffer.readableBytes))!)
                        left -= kept.last!.readableBytes
                    }
                    entry.operation = .write(kept, flags: flags)
                }
            }
            clipped.append(entry)
        }
        entries = clipped
        bytes = entries.reduce(0) { $0 + $1.dataBytes }
        folded = ByteRanges(ordered: folded.clamped(to: 0..<size)) ?? ByteRanges()
    }

    /// What to send again, in the order it was answered, each entry wholly overwritten by a
    /// later one left out; and the sequence a flush after them covers.
    func replay() -> (entries: [Entry], through: Int) {
        var later = ByteRanges()
        var kept: [Entry] = []
        for entry in entries.reversed() {
            let covering = later.clamped(to: entry.range)
            let overwritten = covering.count == 1 && covering[0] == entry.range
            if !overwritten { kept.append(entry) }
            later.insert(entry.range)
        }
        return (kept.reversed(), lastSequence)
    }

    /// With the window off: the ranges answered and not covered by a flush, which a server
    /// that restarted may have lost. The log is empty afterwards.
    mutating func takeRangesInDoubt() -> ByteRanges {
        var ranges = folded
        for entry in entries { ranges.insert(entry.range) }
        entries = []
        bytes = 0
        folded = ByteRanges()
        return ranges
    }

    /// Folds the older half of the entries into ranges, so that a client that never flushes
    /// holds a bounded record: at most `maximumEntries` ranges, else their hull.
    private mutating func fold() {
        let half = entries.count / 2
        for entry in entries.prefix(half) { folded.insert(entry.range) }
        foldedThrough = entries[half - 1].sequence
        entries.removeFirst(half)
        if folded.ranges.count > maximumEntries, let first = folded.ranges.first, let last = folded.ranges.last {
            folded = ByteRanges()
            folded.insert(first.lowerBound..<last.upperBound)
        }
    }
}
