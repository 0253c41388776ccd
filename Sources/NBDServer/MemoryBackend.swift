import NBDCore
import NIOConcurrencyHelpers
import NIOCore

/// A sparse in-memory disk: only pages that were written hold memory, so a 1 TiB export costs
/// nothing until used. Block status reports unwritten pages as holes that read as zeroes.
public final class MemoryBackend: NBDServerBackend {
    public let size: UInt64
    public let isReadOnly: Bool
    public var flushCoversAllConnections: Bool { true }
    public var zeroIsFast: Bool { true }

    /// Page size: the granularity of allocation and of block status.
    public static let pageSize = 64 * 1024
    /// Written pages. ByteBuffers, so that reads hand out slices without copying; a page that
    /// is written while a reply still holds a slice of it is copied first (copy on write).
    private let pages = NIOLockedValueBox<[UInt64: ByteBuffer]>([:])

    /// A disk of `size` bytes, all zeroes.
    public init(size: UInt64, readOnly: Bool = false) {
        self.size = size
        self.isReadOnly = readOnly
    }

    public func read(at offset: UInt64, length: Int) async throws -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.reserveCapacity(length)
        pages.withLockedValue { pages in
            forEachPage(offset, UInt64(length)) { page, start, count in
                if let bytes = pages[page] {
                    buffer.writeImmutableBuffer(bytes.getSlice(at: start, length: count)!)
                } else {
                    buffer.writeRepeatingByte(0, count: count)
                }
            }
        }
        return buffer
    }

    /// Data and holes in one pass under the lock: pages never written are holes, and data goes
    /// out as slices of the pages themselves.
    public func readSparse(at offset: UInt64, length: Int) async throws -> [NBDServerReadPart] {
        var parts: [NBDServerReadPart] = []
        pages.withLockedValue { pages in
            forEachPage(offset, UInt64(length)) { page, start, count in
                if let bytes = pages[page] {
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
                forEachPage(position, UInt64(data.readableBytes)) { page, start, count in
                    pages[page, default: ByteBuffer(repeating: 0, count: Self.pageSize)]
                        .setBuffer(data.getSlice(at: index, length: count)!, at: start)
                    index += count
                }
                position += UInt64(data.readableBytes)
            }
        }
    }

    public func flush() async throws {}

    public func trim(at offset: UInt64, length: UInt64) async throws {
        try await zero(at: offset, length: length, noHole: false)
    }

    public func zero(at offset: UInt64, length: UInt64, noHole: Bool) async throws {
        pages.withLockedValue { pages in
            forEachPage(offset, length) { page, start, count in
                if count == Self.pageSize && !noHole {
                    pages[page] = nil
                } else if pages[page] != nil || noHole {
                    pages[page, default: ByteBuffer(repeating: 0, count: Self.pageSize)].setRepeatingByte(0, count: count, at: start)
                }
            }
        }
    }

    public func extents(at offset: UInt64, length: UInt64) async throws -> [BlockDescriptor] {
        // Flags of base:allocation: NBD_STATE_HOLE | NBD_STATE_ZERO for pages never written.
        // At most 1 GiB per answer: the client asks again from where it ends.
        var result: [BlockDescriptor] = []
        pages.withLockedValue { pages in
            forEachPage(offset, min(length, 1 << 30)) { page, _, count in
                let flags: UInt64 = pages[page] == nil ? 3 : 0
                if let last = result.last, last.flags == flags {
                    result[result.count - 1].length += UInt64(count)
                } else {
                    result.append(BlockDescriptor(length: UInt64(count), flags: flags))
                }
            }
        }
        return result
    }

    /// Calls `body` with each page touched by the range: page number, start in page, byte count.
    private func forEachPage(_ offset: UInt64, _ length: UInt64, _ body: (UInt64, Int, Int) -> Void) {
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
