@testable import NBD
import NIOCore
import Testing

/// Where READ data lands: as it came when it arrives whole, else copied into place.
@Suite("Read destination")
struct ReadDestinationTests {
    static let length = 256 << 10
    static let data = ByteBuffer(bytes: (0..<length).map { UInt8(truncatingIfNeeded: $0 * 7 + 3) })

    @Test func dataArrivingWholeIsKeptWithoutACopy() {
        // A slice in the middle of a larger "receive buffer".
        var received = ByteBuffer(repeating: 0xEE, count: 100)
        received.writeImmutableBuffer(Self.data)
        let slice = received.getSlice(at: 100, length: Self.length)!
        let destination = ReadDestination(exportOffset: 4096, length: Self.length, allocator: ByteBufferAllocator())
        destination.write(slice, at: 4096)
        let result = destination.take()
        #expect(result == Self.data)
        // The same storage: no byte was copied.
        let sameStorage = result.withUnsafeReadableBytes { ours in slice.withUnsafeReadableBytes { theirs in ours.baseAddress == theirs.baseAddress } }
        #expect(sameStorage)
    }

    @Test func dataArrivingInPiecesAndHolesIsAssembled() {
        let destination = ReadDestination(exportOffset: 4096, length: Self.length, allocator: ByteBufferAllocator())
        destination.write(Self.data.getSlice(at: 70_000, length: 100_000)!, at: 4096 + 70_000)
        destination.write(Self.data.getSlice(at: 0, length: 70_000)!, at: 4096)
        destination.zero(at: 4096 + 170_000, length: Self.length - 170_000)
        var expected = Self.data.getSlice(at: 0, length: 170_000)!
        expected.writeRepeatingByte(0, count: Self.length - 170_000)
        #expect(destination.take() == expected)
    }

    @Test func smallReadsAreCopiedSoTheyHoldNoReceiveBuffer() {
        let small = Self.data.getSlice(at: 0, length: 4096)!
        let destination = ReadDestination(exportOffset: 0, length: 4096, allocator: ByteBufferAllocator())
        destination.write(small, at: 0)
        let result = destination.take()
        #expect(result == small)
        let sameStorage = result.withUnsafeReadableBytes { ours in small.withUnsafeReadableBytes { theirs in ours.baseAddress == theirs.baseAddress } }
        #expect(!sameStorage)
    }

    @Test func segmentsComeBackInExportOrderWithHolesAsZeroes() {
        let destination = ReadDestination(segmentsOf: Self.length, exportOffset: 4096)
        // Chunks of a structured reply may come in any order.
        destination.write(Self.data.getSlice(at: 100_000, length: 100_000)!, at: 4096 + 100_000)
        destination.zero(at: 4096 + 200_000, length: Self.length - 200_000)
        destination.write(Self.data.getSlice(at: 0, length: 100_000)!, at: 4096)
        let segments = destination.takeSegments()
        #expect(segments.map(\.readableBytes) == [100_000, 100_000, Self.length - 200_000])
        var joined = ByteBuffer()
        for segment in segments { joined.writeImmutableBuffer(segment) }
        var expected = Self.data.getSlice(at: 0, length: 200_000)!
        expected.writeRepeatingByte(0, count: Self.length - 200_000)
        #expect(joined == expected)
    }

    @Test func readIntoAppendsAfterWhatTheBufferHolds() {
        let destination = ReadDestination(appendingTo: ByteBuffer(string: "head"), exportOffset: 0, length: Self.length)
        destination.write(Self.data, at: 0)
        var expected = ByteBuffer(string: "head")
        expected.writeImmutableBuffer(Self.data)
        #expect(destination.take() == expected)
    }
}
