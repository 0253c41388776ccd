@_spi(NBDMachines) import NBDCore
import NIOCore

/// The written pages of a sparse in-memory disk, in a two-level directory as nbdkit's sparse
/// array keeps them: pages grouped in chunks, and the chunks' numbers kept sorted. A hole of
/// any size between two chunks is one step, so block status and trimming cost what the data
/// costs, never what the size does.
struct SparsePages {
    /// The granularity of allocation and of block status.
    static let pageSize = 64 * 1024
    /// Pages in a chunk (16 MiB): a chunk's table is small beside one page of data.
    static let pagesPerChunk = 256

    private struct Chunk {
        var pages = [ByteBuffer?](repeating: nil, count: SparsePages.pagesPerChunk)
        /// Pages that are not nil: a chunk that has none leaves the directory.
        var count = 0

        mutating func modify(slot: Int, _ body: (inout ByteBuffer) -> Void) {
            if pages[slot] == nil {
                pages[slot] = ByteBuffer(repeating: 0, count: SparsePages.pageSize)
                count += 1
            }
            body(&pages[slot]!)
        }
    }

    private var chunks: [UInt64: Chunk] = [:]
    /// The keys of `chunks`, sorted.
    private var order: [UInt64] = []
    /// The disk's size in bytes, kept with its pages so that a resize and the I/O beside it
    /// see one another whole.
    var size: UInt64

    /// A disk of `size` bytes with no page written.
    init(size: UInt64) {
        self.size = size
    }

    /// The page's bytes, or nil when it was never written (or was trimmed).
    subscript(page: UInt64) -> ByteBuffer? {
        chunks[page / UInt64(Self.pagesPerChunk)]?.pages[Int(page % UInt64(Self.pagesPerChunk))]
    }

    /// Changes a page in place, making it (all zeroes) first if it was a hole.
    mutating func modify(page: UInt64, _ body: (inout ByteBuffer) -> Void) {
        let (number, slot) = (page / UInt64(Self.pagesPerChunk), Int(page % UInt64(Self.pagesPerChunk)))
        if chunks[number] == nil {
            chunks[number] = Chunk()
            order.insert(number, at: firstChunk(atOrAfter: number))
        }
        chunks[number]!.modify(slot: slot, body)
    }

    /// Makes the page a hole again.
    mutating func remove(page: UInt64) {
        let (number, slot) = (page / UInt64(Self.pagesPerChunk), Int(page % UInt64(Self.pagesPerChunk)))
        guard chunks[number]?.pages[slot] != nil else { return }
        chunks[number]!.pages[slot] = nil
        chunks[number]!.count -= 1
        if chunks[number]!.count == 0 {
            chunks[number] = nil
            order.remove(at: firstChunk(atOrAfter: number))
        }
    }

    /// The written pages from `first` up to `last` (inclusive), in order: only chunks that hold
    /// data are visited. `body` returns false to stop.
    func forEachWrittenPage(from first: UInt64, through last: UInt64, _ body: (UInt64) -> Bool) {
        let perChunk = UInt64(Self.pagesPerChunk)
        var index = firstChunk(atOrAfter: first / perChunk)
        while index < order.count, order[index] <= last / perChunk {
            let number = order[index]
            let pages = chunks[number]!.pages
            let start = number == first / perChunk ? Int(first % perChunk) : 0
            let end = number == last / perChunk ? Int(last % perChunk) : Self.pagesPerChunk - 1
            for slot in start...end where pages[slot] != nil {
                guard body(number * perChunk + UInt64(slot)) else { return }
            }
            index += 1
        }
    }

    /// `base:allocation` extents from `offset` to `end`, in at most `maximumCount` descriptors:
    /// pages never written are holes that read as zeroes (`NBD_STATE_HOLE | NBD_STATE_ZERO`).
    func extents(from offset: UInt64, to end: UInt64, maximumCount: Int) -> [BlockDescriptor] {
        guard offset < end else { return [] }
        let pageSize = UInt64(Self.pageSize)
        var result: [BlockDescriptor] = []
        var position = offset
        /// Extends the answer to `limit`; false when that needs one extent more than the cap.
        func append(upTo limit: UInt64, flags: UInt64) -> Bool {
            guard limit > position else { return true }
            if result.last?.flags == flags {
                result[result.count - 1].length += limit - position
            } else if result.count < maximumCount {
                result.append(BlockDescriptor(length: limit - position, flags: flags))
            } else {
                return false
            }
            position = limit
            return true
        }
        // Cut short by the cap, the answer ends where it stopped; the client asks again from there.
        var complete = true
        forEachWrittenPage(from: offset / pageSize, through: (end - 1) / pageSize) { page in
            complete = append(upTo: max(position, page * pageSize), flags: 3) && append(upTo: min(end, (page + 1) * pageSize), flags: 0)
            return complete
        }
        if complete { _ = append(upTo: end, flags: 3) }
        return result
    }

    /// The index in `order` of the first chunk numbered `number` or more.
    private func firstChunk(atOrAfter number: UInt64) -> Int {
        var (low, high) = (0, order.count)
        while low < high {
            let middle = (low + high) / 2
            if order[middle] < number { low = middle + 1 } else { high = middle }
        }
        return low
    }
}
