import NBDCopy
import NBDCore
import NIOConcurrencyHelpers
import NIOCore
import Testing

/// The cursor that hands out pieces: in order, covering the source once, block status asked
/// for once per window, and a zero area that runs past a window handed out whole.
@Suite("Cursor")
struct CursorTests {
    static let gib: UInt64 = 1 << 30
    static let size = 3 * gib + gib / 2
    static let pieceSize: UInt64 = 32 << 20
    /// Zeroes across two window edges, reported as block status may: past the end asked for.
    static let zeroes = (gib * 3 / 4)..<(gib * 9 / 4)

    @Test func piecesTileTheSourceAndAZeroAreaIsOnePiece() async throws {
        let source = ZeroReportingSource(size: Self.size, zeroes: [Self.zeroes])
        let cursor = Cursor(source: source, size: Self.size, pieceSize: Self.pieceSize)
        var pieces: [(range: Range<UInt64>, kind: Cursor.Kind)] = []
        while let piece = try await cursor.next() { pieces.append((piece.range, piece.kind)) }
        try check(pieces)
        #expect(pieces.filter { $0.kind == .zero }.map(\.range) == [Self.zeroes])
        // Windows at 0, after the zero area, and one more before the end: 3 lookups, not 4.
        #expect(source.lookups == [0, Self.zeroes.upperBound, Self.zeroes.upperBound + Cursor.windowSize])
    }

    /// Workers drawing at once get each byte once, and share each window's one lookup.
    @Test func workersAtOnceShareTheLookups() async throws {
        let source = ZeroReportingSource(size: Self.size, zeroes: [Self.zeroes])
        let cursor = Cursor(source: source, size: Self.size, pieceSize: Self.pieceSize)
        let pieces = try await withThrowingTaskGroup(of: [(range: Range<UInt64>, kind: Cursor.Kind)].self) { group in
            for _ in 0..<8 {
                group.addTask {
                    var mine: [(range: Range<UInt64>, kind: Cursor.Kind)] = []
                    while let piece = try await cursor.next() {
                        mine.append((piece.range, piece.kind))
                        await Task.yield()
                    }
                    return mine
                }
            }
            return try await group.reduce(into: []) { $0 += $1 }
        }
        try check(pieces.sorted { $0.range.lowerBound < $1.range.lowerBound })
        #expect(source.lookups.count == 3)
    }

    /// Where a bitmap says clean nothing is copied, zero or not; zero areas count where it is dirty.
    @Test func cleanAreasWinOverZeroAreas() async throws {
        let source = ZeroReportingSource(size: 100, zeroes: [20..<40, 65..<90], clean: [10..<30, 60..<70])
        let areas = try await Cursor.areas(of: source, from: 0, length: 100)
        #expect(areas.map(\.range) == [10..<30, 30..<40, 60..<70, 70..<90])
        #expect(areas.map(\.kind) == [.clean, .zero, .clean, .zero])
        // What a journal skips counts as clean too.
        var skipping = ByteRanges()
        skipping.insert(0..<5)
        let resumed = try await Cursor.areas(of: source, from: 0, length: 100, skipping: skipping)
        #expect(resumed.first.map { $0.range == 0..<5 && $0.kind == .clean } == true)
    }

    /// In order, touching, covering the source; data pieces at most a piece long and never
    /// across a window's edge.
    func check(_ pieces: [(range: Range<UInt64>, kind: Cursor.Kind)]) throws {
        var position: UInt64 = 0
        for piece in pieces {
            #expect(piece.range.lowerBound == position, "a gap or overlap at \(position)")
            if piece.kind == .data {
                #expect(piece.range.count <= Int(Self.pieceSize))
                let window = piece.range.lowerBound / Cursor.windowSize
                let crossesAnEdge = piece.range.upperBound > (window + 1) * Cursor.windowSize
                let startsAfterZeroes = piece.range.lowerBound >= Self.zeroes.upperBound
                #expect(!crossesAnEdge || startsAfterZeroes, "\(piece.range) crosses a window edge")
            }
            position = piece.range.upperBound
        }
        #expect(position == Self.size)
    }
}

/// A source that only answers block status: its zero and clean ranges, as given, and the
/// offsets it was asked from.
final class ZeroReportingSource: CopySource {
    let size: UInt64?
    let zeroes: [Range<UInt64>]
    let clean: [Range<UInt64>]
    private let asked = NIOLockedValueBox<[UInt64]>([])

    init(size: UInt64, zeroes: [Range<UInt64>], clean: [Range<UInt64>] = []) {
        self.size = size
        self.zeroes = zeroes
        self.clean = clean
    }

    var lookups: [UInt64] { asked.withLockedValue { $0 } }
    var hasCleanRanges: Bool { !clean.isEmpty }

    func zeroRanges(from offset: UInt64, length: UInt64) async throws -> [Range<UInt64>] {
        asked.withLockedValue { $0.append(offset) }
        return zeroes.filter { $0.overlaps(offset..<offset + length) }.map { max($0.lowerBound, offset)..<$0.upperBound }
    }

    func cleanRanges(from offset: UInt64, length: UInt64) async throws -> [Range<UInt64>] {
        clean.map { $0.clamped(to: offset..<offset + length) }.filter { !$0.isEmpty }
    }

    func read(into buffer: inout ByteBuffer, at offset: UInt64, length: Int, worker: Int) async throws {
        Issue.record("the cursor reads nothing")
    }
}
