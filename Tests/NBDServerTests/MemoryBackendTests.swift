@_spi(NBDMachines) import NBDCore
import NIOCore
import Testing

@testable import NBDServer

/// The memory backend's pages: block status and trimming cost what the data costs, and the
/// bytes read back are the bytes written.
@Suite("Memory backend")
struct MemoryBackendTests {
    static let page = UInt64(MemoryBackend.pageSize)

    func written(_ backend: MemoryBackend, pages: [UInt64]) async throws {
        for page in pages {
            try await backend.write(
                ByteBuffer(repeating: UInt8(truncatingIfNeeded: page | 1), count: Int(Self.page)),
                at: page * Self.page,
                fua: false
            )
        }
    }

    /// Zeroes kept allocated (`NBD_CMD_FLAG_NO_HOLE`) are marks: a gibibyte of them stores no
    /// byte, reads as zeroes, and is `NBD_STATE_ZERO` without `NBD_STATE_HOLE` in block status;
    /// data written into it afterwards is data, and the rest stays a mark.
    @Test func zeroesWithNoHoleStoreNothing() async throws {
        let backend = MemoryBackend(size: 64 << 30)
        try await written(backend, pages: [16_384, 16_385])  // 1 GiB in: data the zeroing replaces
        #expect(backend.storedBytes == 2 * Int(Self.page))
        for index: UInt64 in 0..<4 { try await backend.zero(at: index << 30, length: 1 << 30, noHole: true) }
        #expect(backend.storedBytes == 0)
        #expect(
            try await backend.extents(at: 0, length: 64 << 30) == [
                BlockDescriptor(length: 4 << 30, flags: 2), BlockDescriptor(length: 60 << 30, flags: 3),
            ]
        )
        #expect(try await backend.read(at: (1 << 30) + 100, length: 70_000) == ByteBuffer(repeating: 0, count: 70_000))
        // Written into, a page is data (zeroes around the write); its neighbours stay marks.
        try await backend.write(ByteBuffer(repeating: 0xab, count: 4096), at: Self.page + 8192, fua: false)
        #expect(backend.storedBytes == Int(Self.page))
        #expect(
            try await backend.extents(at: 0, length: 3 * Self.page) == [
                BlockDescriptor(length: Self.page, flags: 2), BlockDescriptor(length: Self.page, flags: 0),
                BlockDescriptor(length: Self.page, flags: 2),
            ]
        )
        var expected = ByteBuffer(repeating: 0, count: Int(Self.page))
        expected.setRepeatingByte(0xab, count: 4096, at: 8192)
        #expect(try await backend.read(at: Self.page, length: Int(Self.page)) == expected)
        // A partial zeroing of a mark, with or without NO_HOLE, stores nothing either.
        try await backend.zero(at: 3 * Self.page + 5, length: 10, noHole: false)
        try await backend.zero(at: 4 * Self.page + 5, length: 10, noHole: true)
        #expect(backend.storedBytes == Int(Self.page))
        // A trim makes the marks holes again.
        try await backend.trim(at: 0, length: 4 << 30)
        #expect(try await backend.extents(at: 0, length: 64 << 30) == [BlockDescriptor(length: 64 << 30, flags: 3)])
        #expect(backend.storedBytes == 0)
    }

    /// A fresh terabyte is one hole, in one answer.
    @Test func aFreshTerabyteIsOneExtent() async throws {
        let backend = MemoryBackend(size: 1 << 40)
        #expect(try await backend.extents(at: 0, length: 1 << 40) == [BlockDescriptor(length: 1 << 40, flags: 3)])
        #expect(try await backend.extents(at: 4096, length: 100) == [BlockDescriptor(length: 100, flags: 3)])
    }

    /// Scattered pages over a terabyte: one answer holds every extent, holes between them whole.
    @Test func scatteredPagesAnswerInOnePass() async throws {
        let size: UInt64 = 1 << 40
        let backend = MemoryBackend(size: size)
        // 1000 pages spread over the whole export, two of them neighbours (merged into one extent).
        var pages = (0..<999).map { UInt64($0) * (size / Self.page / 1000) + 7 }
        pages.append(pages[500] + 1)
        try await written(backend, pages: pages)
        let extents = try await backend.extents(at: 0, length: size)
        #expect(extents.reduce(0) { $0 + $1.length } == size)
        #expect(extents.count(where: { $0.flags == 0 }) == 999)
        #expect(extents.count == 999 * 2 + 1)
        // Each data extent is where a page was written.
        var position: UInt64 = 0
        var data: [UInt64] = []
        for extent in extents {
            if extent.flags == 0 { data.append(position / Self.page) }
            position += extent.length
        }
        #expect(data == pages.sorted().filter { $0 != pages[500] + 1 })
    }

    /// A request that starts and ends inside pages.
    @Test func partialPages() async throws {
        let backend = MemoryBackend(size: 1 << 30)
        try await written(backend, pages: [1, 3])
        let extents = try await backend.extents(at: Self.page + 100, length: 3 * Self.page)
        #expect(
            extents == [
                BlockDescriptor(length: Self.page - 100, flags: 0), BlockDescriptor(length: Self.page, flags: 3),
                BlockDescriptor(length: Self.page, flags: 0), BlockDescriptor(length: 100, flags: 3),
            ]
        )
    }

    /// The cap on one answer: it ends where the last extent that fits ends, never claiming data
    /// as a hole or a hole as data, whichever kind the cap falls on.
    @Test(arguments: 1...6) func theCapEndsTheAnswerAtAnExtent(cap: Int) {
        var pages = SparsePages(size: 1 << 40)
        for page: UInt64 in [2, 4, 5, 9] { pages.modify(page: page) { $0.setInteger(UInt8(1), at: 0) } }
        let whole: [BlockDescriptor] = [
            .init(length: 2 * Self.page, flags: 3), .init(length: Self.page, flags: 0), .init(length: Self.page, flags: 3),
            .init(length: 2 * Self.page, flags: 0), .init(length: 3 * Self.page, flags: 3), .init(length: Self.page, flags: 0),
            .init(length: 6 * Self.page, flags: 3),
        ]
        #expect(pages.extents(from: 0, to: 16 * Self.page, maximumCount: 7) == whole)
        #expect(pages.extents(from: 0, to: 16 * Self.page, maximumCount: cap) == Array(whole.prefix(cap)))
    }

    /// Trimming whole pages frees them, partial ones read back zero in the trimmed part only;
    /// NO_HOLE keeps the range allocated (as marks that read as zeroes).
    @Test func trimAndZero() async throws {
        let backend = MemoryBackend(size: 1 << 40)
        try await written(backend, pages: [0, 1, 2, 1 << 20])
        try await backend.trim(at: 100, length: (1 << 40) - 100)
        #expect(
            try await backend.extents(at: 0, length: 1 << 40) == [
                BlockDescriptor(length: Self.page, flags: 0), BlockDescriptor(length: (1 << 40) - Self.page, flags: 3),
            ]
        )
        var expected = ByteBuffer(repeating: 1, count: 100)
        expected.writeRepeatingByte(0, count: Int(Self.page) - 100)
        #expect(try await backend.read(at: 0, length: Int(Self.page)) == expected)
        try await backend.zero(at: 4 * Self.page, length: 2 * Self.page, noHole: true)
        // Allocated, and known to read as zeroes: NBD_STATE_ZERO without NBD_STATE_HOLE.
        #expect(try await backend.extents(at: 4 * Self.page, length: 2 * Self.page) == [BlockDescriptor(length: 2 * Self.page, flags: 2)])
        #expect(
            try await backend.read(at: 4 * Self.page, length: 2 * Int(Self.page)) == ByteBuffer(repeating: 0, count: 2 * Int(Self.page))
        )
    }
}
