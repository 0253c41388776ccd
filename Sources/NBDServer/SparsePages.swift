@_spi(NBDMachines) import NBDCore
import NIOCore

/// The written pages of a sparse in-memory disk, in a two-level directory as nbdkit's sparse
/// array keeps them: pages grouped in chunks, and the chunks' numbers kept sorted. A hole of
/// any size between two chunks is one step, so block status and trimming cost what the data
/// costs, never what the size does. A page zeroed and kept allocated (`NBD_CMD_FLAG_NO_HOLE`)
/// is a mark, not 64 KiB of zeroes: a client's 16-byte request never costs the server memory.
struct SparsePages {
    /// A page that is not a hole.
    enum Page {
        /// Written bytes.
        case data(ByteBuffer)
        /// Allocated, and reads as zeroes.
        case zero
    }

    /// The granularity of allocation and of block status.
    static let pageSize = 64 * 1024
    /// Pages in a chunk (16 MiB): a chunk's table is small beside one page of data.
    static let pagesPerChunk = 256

    private struct Chunk {
        var pages = [Page?](repeating: nil, count: SparsePages.pagesPerChunk)
        /// Pages that are not nil: a chunk that has none leaves the directory.
        var count = 0

        mutating func modify(slot: Int, _ body: (inout ByteBuffer) -> Void) {
            if pages[slot] == nil { count += 1 }
            var bytes: ByteBuffer
            if case .data(let written)? = pages[slot] {
                bytes = written
                // The page's one reference, so that the change is made in place, not in a copy.
                pages[slot] = nil
            } else {
                bytes = ByteBuffer(repeating: 0, count: SparsePages.pageSize)
            }
            body(&bytes)
            pages[slot] = .data(bytes)
        }

        mutating func markZero(slot: Int) {
            if pages[slot] == nil { count += 1 }
            pages[slot] = .zero
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

    /// The page, or nil when it is a hole: never written, or trimmed.
    subscript(page: UInt64) -> Page? {
        chunks[page / UInt64(Self.pagesPerChunk)]?.pages[Int(page % UInt64(Self.pagesPerChunk))]
    }

    /// Changes a page in place, making its bytes (all zeroes) first if it had none.
    mutating func modify(page: UInt64, _ body: (inout ByteBuffer) -> Void) {
        let (number, slot) = (page / UInt64(Self.pagesPerChunk), Int(page % UInt64(Self.pagesPerChunk)))
        makeChunk(number)
        chunks[number]!.modify(slot: slot, body)
    }

    /// Makes the whole page allocated zeroes, dropping its bytes.
    mutating func markZero(page: UInt64) {
        let (number, slot) = (page / UInt64(Self.pagesPerChunk), Int(page % UInt64(Self.pagesPerChunk)))
        makeChunk(number)
        chunks[number]!.markZero(slot: slot)
    }

    private mutating func makeChunk(_ number: UInt64) {
        guard chunks[number] == nil else { return }
        chunks[number] = Chunk()
        order.insert(number, at: firstChunk(atOrAfter: number))
    }

    /// The bytes the pages hold: what the disk costs in memory, beside its directory.
    var storedBytes: Int {
        chunks.values.reduce(0) { total, chunk in
            total + chunk.pages.reduce(0) { if case .data = $1 { $0 + Self.pageSize } else { $0 } }
        }
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
    /// pages never written are holes that read as zeroes (`NBD_STATE_HOLE | NBD_STATE_ZERO`),
    /// pages zeroed and kept allocated are `NBD_STATE_ZERO` alone, written pages 0.
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
            let flags: UInt64 = if case .zero? = self[page] { 2 } else { 0 }
            complete = append(upTo: max(position, page * pageSize), flags: 3) && append(upTo: min(end, (page + 1) * pageSize), flags: flags)
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
