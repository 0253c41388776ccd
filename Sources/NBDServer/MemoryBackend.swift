@_spi(NBDMachines) import NBDCore
import NIOConcurrencyHelpers
import NIOCore

/// A sparse in-memory disk: only pages that were written hold memory, so a 1 TiB export costs
/// nothing until used. Block status reports unwritten pages as holes that read as zeroes. It
/// can change size (see ``resize(to:)``), up to ``maximumSize``.
public final class MemoryBackend: NBDServerBackend {
    public var size: UInt64 { pages.withLockedValue { $0.size } }
    public let isReadOnly: Bool
    /// The largest size a resize may grow the disk to.
    public let maximumSize: UInt64
    public var flushCoversAllConnections: Bool { true }
    public var zeroIsFast: Bool { true }

    /// Page size: the granularity of allocation and of block status.
    public static let pageSize = SparsePages.pageSize
    /// Written pages. ByteBuffers, so that reads hand out slices without copying; a page that
    /// is written while a reply still holds a slice of it is copied first (copy on write).
    private let pages: NIOLockedValueBox<SparsePages>

    /// A disk of `size` bytes, all zeroes, that a resize may grow up to `maximumSize` (by
    /// default as large as a size can be).
    public init(size: UInt64, readOnly: Bool = false, maximumSize: UInt64 = UInt64(Int64.max)) {
        self.pages = NIOLockedValueBox(SparsePages(size: size))
        self.isReadOnly = readOnly
        self.maximumSize = maximumSize
    }

    /// Grows the disk (the new bytes read as zeroes and hold no memory) or shrinks it (the
    /// pages past the new end are freed, so that growing again reads zeroes there). Beyond
    /// ``maximumSize`` it fails with `ENOSPC`.
    public func resize(to size: UInt64) async throws {
        guard size <= maximumSize else {
            throw NBDServerError(.ENOSPC, "cannot grow the memory disk to \(size) bytes: at most \(maximumSize)")
        }
        pages.withLockedValue { pages in
            if size < pages.size { Self.zero(&pages, at: size, length: pages.size - size, noHole: false) }
            pages.size = size
        }
    }

    public func read(at offset: UInt64, length: Int) async throws -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.reserveCapacity(length)
        pages.withLockedValue { pages in
            Self.forEachPage(offset, UInt64(length)) { page, start, count in
                if case .data(let bytes)? = pages[page] {
                    buffer.writeImmutableBuffer(bytes.getSlice(at: start, length: count)!)
                } else {
                    buffer.writeRepeatingByte(0, count: count)
                }
            }
        }
        return buffer
    }

    /// Data and holes in one pass under the lock: pages that hold no bytes (never written, or
    /// zeroed) go out as holes, which read as zeroes, and data as slices of the pages themselves.
    public func readSparse(at offset: UInt64, length: Int) async throws -> [NBDServerReadPart] {
        var parts: [NBDServerReadPart] = []
        pages.withLockedValue { pages in
            Self.forEachPage(offset, UInt64(length)) { page, start, count in
                if case .data(let bytes)? = pages[page] {
                    parts.append(.data(bytes.getSlice(at: start, length: count)!))
                } else if case .hole(let earlier)? = parts.last {
                    parts[parts.count - 1] = .hole(earlier + count)
                } else {
                    parts.append(.hole(count))
                }
            }
        }
        return parts
    }

    public func write(_ data: ByteBuffer, at offset: UInt64, fua: Bool) async throws {
        try await write(segments: [data], at: offset, fua: fua)
    }

    /// Copies each piece straight into the pages: the data is never gathered first.
    public func write(segments: [ByteBuffer], at offset: UInt64, fua: Bool) async throws {
        pages.withLockedValue { pages in
            var position = offset
            for data in segments {
                var index = data.readerIndex
                Self.forEachPage(position, UInt64(data.readableBytes)) { page, start, count in
                    pages.modify(page: page) { $0.setBuffer(data.getSlice(at: index, length: count)!, at: start) }
                    index += count
                }
                position += UInt64(data.readableBytes)
            }
        }
    }

    public func flush() async throws {}

    /// The bytes of data the disk holds in memory (its written pages).
    var storedBytes: Int { pages.withLockedValue { $0.storedBytes } }

    public func trim(at offset: UInt64, length: UInt64) async throws {
        try await zero(at: offset, length: length, noHole: false)
    }

    /// Whole pages become holes again (visiting only the pages that hold data, so a terabyte
    /// costs what its data does); partial pages are zeroed in place. With `noHole`, every page
    /// of the range is allocated, as the spec asks ("the area MUST be fully provisioned"): whole
    /// pages as marks that read as zeroes and hold no bytes, so that no request makes the server
    /// store zeroes.
    public func zero(at offset: UInt64, length: UInt64, noHole: Bool) async throws {
        guard length > 0 else { return }
        pages.withLockedValue { Self.zero(&$0, at: offset, length: length, noHole: noHole) }
    }

    private static func zero(_ pages: inout SparsePages, at offset: UInt64, length: UInt64, noHole: Bool) {
        let pageSize = UInt64(Self.pageSize)
        if noHole {
            Self.forEachPage(offset, length) { page, start, count in
                // Only part of a page of data is zeroed in place; anything else (a whole page, or
                // part of a hole or of a mark: a page of zeroes once allocated) becomes the mark.
                if case .data? = pages[page], count < Self.pageSize {
                    pages.modify(page: page) { $0.setRepeatingByte(0, count: count, at: start) }
                } else {
                    pages.markZero(page: page)
                }
            }
            return
        }
        let end = offset + length
        var written: [UInt64] = []
        pages.forEachWrittenPage(from: offset / pageSize, through: (end - 1) / pageSize) { page in
            written.append(page)
            return true
        }
        for page in written {
            let start = max(offset, page * pageSize)
            let stop = min(end, (page + 1) * pageSize)
            if stop - start == pageSize {
                pages.remove(page: page)
            } else if case .data? = pages[page] {
                pages.modify(page: page) { $0.setRepeatingByte(0, count: Int(stop - start), at: Int(start - page * pageSize)) }
            }
        }
    }

    /// Answers in time proportional to the data in the range: a hole of any size is one extent.
    public func extents(at offset: UInt64, length: UInt64) async throws -> [BlockDescriptor] {
        pages.withLockedValue { pages in
            let end = min(pages.size, offset + length)
            return pages.extents(from: offset, to: end, maximumCount: BlockDescriptor.mostInOneAnswer)
        }
    }

    /// Calls `body` with each page touched by the range: page number, start in page, byte count.
    private static func forEachPage(_ offset: UInt64, _ length: UInt64, _ body: (UInt64, Int, Int) -> Void) {
        var position = offset
        let end = offset + length
        let pageSize = UInt64(Self.pageSize)
        while position < end {
            let page = position / pageSize
            let start = Int(position % pageSize)
            let count = Int(min(pageSize - UInt64(start), end - position))
            body(page, start, count)
            position += UInt64(count)
        }
    }
}
