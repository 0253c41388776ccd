import Foundation
import NBDSystem
import NIOCore
import Testing

/// The file layer on real files in a temporary folder: holes found, punched and zeroed, data
/// read and written on the thread pool, nothing called a hole that holds data.
@Suite("LocalFile")
struct LocalFileTests {
    /// A fresh folder, removed afterwards.
    final class Folder {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("localfile-\(UUID().uuidString)")
        init() throws { try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true) }
        func path(_ name: String) -> String { url.appendingPathComponent(name).path }
        deinit { try? FileManager.default.removeItem(at: url) }
    }

    /// A 64 MiB file with 1 MiB of data at 8 MiB and 1 MiB at 40 MiB, the rest holes.
    static func sparseFile(_ folder: Folder) async throws -> LocalFile {
        _ = FileManager.default.createFile(atPath: folder.path("sparse.raw"), contents: nil)
        let file = try LocalFile(path: folder.path("sparse.raw"), access: .readWrite)
        try file.setLength(64 << 20)
        try await file.write([ByteBuffer(repeating: 0x11, count: 1 << 20)], at: 8 << 20)
        try await file.write([ByteBuffer(repeating: 0x22, count: 1 << 20)], at: 40 << 20)
        return file
    }

    @Test func holesAndDataAreFoundInOrder() async throws {
        let folder = try Folder()
        let file = try await Self.sparseFile(folder)
        #expect(file.kind == .regular)
        #expect(try file.size() == 64 << 20)
        let mib: UInt64 = 1 << 20
        let extents = try await file.extents(in: 0..<64 * mib, size: 64 * mib, limit: 100)
        let expected: [LocalFile.Extent] = [
            .init(0..<8 * mib, isHole: true), .init(8 * mib..<9 * mib, isHole: false),
            .init(9 * mib..<40 * mib, isHole: true), .init(40 * mib..<41 * mib, isHole: false),
            .init(41 * mib..<64 * mib, isHole: true),
        ]
        #expect(extents == expected)
        // A range in the middle, clipped to the file's size; and the limit.
        let middle = try await file.extents(in: 8 * mib + 5..<100 * mib, size: 64 * mib, limit: 2)
        let expectedMiddle: [LocalFile.Extent] = [.init(8 * mib + 5..<9 * mib, isHole: false), .init(9 * mib..<40 * mib, isHole: true)]
        #expect(middle == expectedMiddle)
        #expect(try await file.extents(in: (64 << 20)..<(65 << 20), size: 64 << 20, limit: 10).isEmpty)
    }

    @Test func readsAndWritesReuseTheBuffer() async throws {
        let folder = try Folder()
        let file = try await Self.sparseFile(folder)
        var buffer = ByteBuffer()
        buffer.reserveCapacity(1 << 20)
        let storage = buffer.withUnsafeReadableBytes { UInt(bitPattern: $0.baseAddress) }
        #expect(try await file.read(into: &buffer, at: (8 << 20) - 4096, length: 8192) == 8192)
        #expect(buffer.readableBytesView.prefix(4096).allSatisfy { $0 == 0 })
        #expect(buffer.readableBytesView.suffix(4096).allSatisfy { $0 == 0x11 })
        #expect(buffer.withUnsafeReadableBytes { UInt(bitPattern: $0.baseAddress) } == storage, "read in place")
        // Past the end: what there is.
        buffer.clear()
        #expect(try await file.read(into: &buffer, at: (64 << 20) - 100, length: 4096) == 100)
        // Several buffers written one after another.
        try await file.write([ByteBuffer(bytes: [1, 2]), ByteBuffer(bytes: [3])], at: 10)
        buffer.clear()
        try await file.read(into: &buffer, at: 10, length: 3)
        #expect(Array(buffer.readableBytesView) == [1, 2, 3])
        try await file.sync()
    }

    @Test func zeroingPunchesOrZeroesInPlace() async throws {
        let folder = try Folder()
        let file = try await Self.sparseFile(folder)
        #expect(try file.allocatedBytes() >= 2 << 20)
        // Punched: the data is gone and so are its blocks.
        #expect(try await file.zero((8 << 20)..<(9 << 20), mayPunch: true) == .punched)
        #expect(try file.allocatedBytes() < (3 << 20) / 2)
        // Zeroed in place: allocated, reading as zeroes.
        let zeroing = try await file.zero((40 << 20)..<(41 << 20), mayPunch: false)
        #expect(zeroing == .zeroRange || zeroing == .written)
        #expect(try file.allocatedBytes() >= 1 << 20)
        var buffer = ByteBuffer()
        try await file.read(into: &buffer, at: 0, length: 64 << 20)
        #expect(buffer == ByteBuffer(repeating: 0, count: 64 << 20))
        // A discard on a regular file is a punched hole.
        #expect(try await file.discard((40 << 20)..<(41 << 20)))
        #expect(try file.allocatedBytes() < 1 << 20)
        #expect(try await file.extents(in: 0..<(64 << 20), size: 64 << 20, limit: 10) == [.init(0..<(64 << 20), isHole: true)])
    }

    @Test func refusalsAndStreams() async throws {
        let folder = try Folder()
        #expect(throws: FileIOError.self) { try LocalFile(path: folder.path("missing"), access: .read) }
        let file = try LocalFile(path: folder.path("new.raw"), access: .createOrWrite)
        #expect(throws: FileIOError.self) { try file.setLength(UInt64.max) }
        // A pipe is a stream: no size, never a hole, zeroes written.
        let pipe = Pipe()
        let stream = try LocalFile(path: "/dev/fd/\(pipe.fileHandleForWriting.fileDescriptor)", access: .createOrWrite)
        #expect(stream.kind == .stream)
        #expect(try stream.size() == nil)
        #expect(try await stream.extents(in: 0..<100, size: 100, limit: 10) == [.init(0..<100, isHole: false)])
        #expect(try await stream.zero(0..<10, mayPunch: true) == .written)
        #expect(pipe.fileHandleForReading.readData(ofLength: 10) == Data(count: 10))
    }
}
