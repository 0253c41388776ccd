import NIOCore
import Testing

@testable import NBD

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
        let sameStorage = result.withUnsafeReadableBytes { ours in
            slice.withUnsafeReadableBytes { theirs in ours.baseAddress == theirs.baseAddress }
        }
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
        let sameStorage = result.withUnsafeReadableBytes { ours in
            small.withUnsafeReadableBytes { theirs in ours.baseAddress == theirs.baseAddress }
        }
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

    /// Reads the socket would give: `pieces` bytes of `Self.data` from `start` on, at most the room offered.
    final class Source {
        var position: Int
        init(from position: Int) { self.position = position }
        func read(into room: UnsafeMutableRawBufferPointer) -> Int {
            let count = min(room.count, ReadDestinationTests.length - position)
            ReadDestinationTests.data.getSlice(at: position, length: count)!.withUnsafeReadableBytes { room.copyMemory(from: $0) }
            position += count
            return count
        }
    }

    @Test func directReadsFillTheBufferInPlace() {
        // After a first piece copied from a receive buffer, the rest straight from the "socket".
        let destination = ReadDestination(appendingTo: ByteBuffer(string: "head"), exportOffset: 8192, length: Self.length)
        destination.write(Self.data.getSlice(at: 0, length: 1000)!, at: 8192)
        let source = Source(from: 1000)
        #expect(destination.receive(at: 8192 + 1000, count: 50_000, using: source.read(into:)) == 50_000)
        #expect(destination.receive(at: 8192 + 51_000, count: Self.length - 51_000, using: source.read(into:)) == Self.length - 51_000)
        var expected = ByteBuffer(string: "head")
        expected.writeImmutableBuffer(Self.data)
        #expect(destination.take() == expected)
    }

    @Test func directReadsIntoANewBufferMakeRoomFirst() {
        let destination = ReadDestination(exportOffset: 0, length: Self.length, allocator: ByteBufferAllocator())
        let source = Source(from: 0)
        // A socket that has less than asked for: what it gives is all that counts.
        #expect(
            destination.receive(
                at: 0,
                count: Self.length,
                using: { source.read(into: UnsafeMutableRawBufferPointer(rebasing: $0.prefix(70_000))) }
            ) == 70_000
        )
        #expect(destination.receive(at: 70_000, count: Self.length - 70_000, using: { _ in 0 }) == 0)
        #expect(destination.receive(at: 70_000, count: Self.length - 70_000, using: source.read(into:)) == Self.length - 70_000)
        #expect(destination.take() == Self.data)
    }

    @Test func onlyReadsIntoOneBufferAreFilledInPlace() {
        // Segments are kept as they arrive (slices of batch buffers), never read into directly.
        #expect(!ReadDestination(segmentsOf: Self.length, exportOffset: 0).fillsInPlace)
        #expect(ReadDestination(exportOffset: 0, length: Self.length, allocator: ByteBufferAllocator()).fillsInPlace)
        #expect(ReadDestination(appendingTo: ByteBuffer(), exportOffset: 0, length: Self.length).fillsInPlace)
    }
}
