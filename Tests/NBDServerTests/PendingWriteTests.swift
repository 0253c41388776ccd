import NBD
import NIOConcurrencyHelpers
import NIOCore
import Testing

@_spi(NBDMachines) @testable import NBDCore
@testable import NBDServer

/// A WRITE's data as it arrives at the built-in server: kept as slices, then gathered.
@Suite("Built-in server: pending writes")
struct PendingWriteTests {
    let data = ByteBuffer(bytes: (0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 5) })

    func arrive(in pieces: Int) -> PendingWrite {
        var pending = PendingWrite(RequestHeader(type: .write, cookie: 1, offset: 0, length: UInt64(data.readableBytes)))
        let size = (data.readableBytes + pieces - 1) / pieces
        var rest = data
        while let piece = rest.readSlice(length: min(size, rest.readableBytes)), piece.readableBytes > 0 {
            pending.append(piece)
        }
        return pending
    }

    func joined(_ segments: [ByteBuffer]) -> ByteBuffer {
        var all = ByteBuffer()
        for segment in segments { all.writeImmutableBuffer(segment) }
        return all
    }

    @Test func aFewPiecesStayAsTheyCame() {
        let pending = arrive(in: PendingWrite.maximumSegments)
        #expect(pending.missing == 0)
        #expect(pending.segments.count == PendingWrite.maximumSegments)
        #expect(joined(pending.segments) == data)
    }

    @Test func manySmallPiecesAreGatheredIntoOneBuffer() {
        let pending = arrive(in: 1000)
        #expect(pending.missing == 0)
        #expect(pending.segments.count == 1)
        #expect(pending.segments[0] == data)
    }

    @Test func theDefaultBackendWriteGathersSegments() async throws {
        let backend = GatheringBackend()
        try await backend.write(segments: [data.getSlice(at: 0, length: 10)!, data.getSlice(at: 10, length: 99_990)!], at: 0, fua: false)
        #expect(backend.written.withLockedValue { $0 } == [data])
    }
}

/// Implements only the single-buffer write, to exercise the protocol's default.
private final class GatheringBackend: NBDServerBackend {
    let written = NIOLockedValueBox<[ByteBuffer]>([])
    var size: UInt64 { 1 << 20 }
    var isReadOnly: Bool { false }
    var flushCoversAllConnections: Bool { true }
    var zeroIsFast: Bool { false }
    func read(at offset: UInt64, length: Int) async throws -> ByteBuffer { ByteBuffer(repeating: 0, count: length) }
    func write(_ data: ByteBuffer, at offset: UInt64, fua: Bool) async throws { written.withLockedValue { $0.append(data) } }
    func flush() async throws {}
    func trim(at offset: UInt64, length: UInt64) async throws {}
    func zero(at offset: UInt64, length: UInt64, noHole: Bool) async throws {}
    func extents(at offset: UInt64, length: UInt64) async throws -> [BlockDescriptor] { [BlockDescriptor(length: UInt64(size), flags: 0)] }
}
