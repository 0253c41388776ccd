import Foundation
import NIOCore
import TestSupport
import Testing

@testable import NBD
@testable import NBDServer

/// `NBD_CMD_RESIZE` between our client and our server over real sockets (no other peer
/// implements the extension): the size every connection sees, the bytes a shrink drops, and
/// the refusals.
@Suite("Resize over sockets")
struct ResizeTests {
    static let size: UInt64 = 1 << 20

    /// A server of `backend` on a fresh Unix socket, and its URI; stopped after `body`.
    func serving<Result>(
        _ backend: any NBDServerBackend,
        resizable: Bool = true,
        _ body: (NBDURI) async throws -> Result
    ) async throws -> Result {
        let socket = FileManager.default.temporaryDirectory.appendingPathComponent("nbd-resize-\(UUID().uuidString.prefix(8)).sock").path
        let server = try await NBDServer.start(
            exports: [NBDServerExport(backend: backend, resizableUpTo: resizable ? 1 << 40 : nil)],
            on: .unix(path: socket)
        )
        defer { try? FileManager.default.removeItem(atPath: socket) }
        do {
            let result = try await body(NBDURI(socket: socket))
            await server.shutdown()
            return result
        } catch {
            await server.shutdown()
            throw error
        }
    }

    func pattern(_ count: Int, seed: UInt8) -> ByteBuffer {
        ByteBuffer(bytes: (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed)) })
    }

    /// Resizes made at once on one export go one after the other: the size it keeps is the
    /// server's, the one a new connection negotiates.
    @Test func resizesAtOnceEndAtTheServersSize() async throws {
        try await serving(MemoryBackend(size: Self.size, maximumSize: 16 * Self.size)) { uri in
            let export = try await NBDExport.connect(to: uri)
            for round in 1...5 {
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for factor in UInt64(1)...4 { group.addTask { try await export.resize(to: factor * UInt64(round) * 65536) } }
                    try await group.waitForAll()
                }
                let fresh = try await NBDExport.connect(to: uri)
                #expect(export.size == fresh.size, "round \(round)")
                await fresh.disconnect()
            }
            await export.disconnect()
        }
    }

    @Test func oneConnectionShrinksAndTheOtherGetsENOSPCPastTheNewEnd() async throws {
        try await serving(MemoryBackend(size: Self.size)) { uri in
            let resizer = try await NBDExport.connect(to: uri)
            let other = try await NBDExport.connect(to: uri)
            #expect(resizer.info.canResize && other.size == Self.size)
            try await resizer.write(pattern(8192, seed: 1), at: 0)
            try await resizer.write(pattern(8192, seed: 2), at: Self.size - 8192)
            try await resizer.resize(to: Self.size / 2)
            #expect(resizer.size == Self.size / 2 && resizer.info.size == Self.size / 2)
            // The other connection still thinks the export is 1 MiB: the server refuses.
            await #expect(throws: NBDError.self) { try await other.write(pattern(4096, seed: 3), at: Self.size / 2) }
            do {
                try await other.write(pattern(4096, seed: 3), at: Self.size / 2)
            } catch let error as NBDError {
                #expect(error.serverErrno == .ENOSPC)
            }
            #expect(try await other.read(at: 0, length: 8192) == pattern(8192, seed: 1))
            // Locally refused on the connection that resized: nothing sent.
            do {
                _ = try await resizer.read(at: Self.size / 2, length: 512)
                Issue.record("a read past the new end was sent")
            } catch let error as NBDError {
                #expect(error.code == .invalidArgument && error.serverErrno == nil)
            }
            // Grown again: what the shrink dropped reads as zeroes, not as the old bytes.
            try await resizer.resize(to: Self.size)
            #expect(try await resizer.read(at: Self.size - 8192, length: 8192) == ByteBuffer(repeating: 0, count: 8192))
            // A new connection negotiates the size of now.
            let late = try await NBDExport.connect(to: uri)
            #expect(late.size == Self.size)
            try await resizer.resize(to: 3 * Self.size)
            let later = try await NBDExport.connect(to: uri)
            #expect(later.size == 3 * Self.size)
            try await later.write(pattern(4096, seed: 4), at: 3 * Self.size - 4096)
            #expect(try await resizer.read(at: 3 * Self.size - 4096, length: 4096) == pattern(4096, seed: 4))
            for export in [resizer, other, late, later] { await export.disconnect() }
        }
    }

    @Test func requestsOnEveryConnectionOfAClientFollowItsResize() async throws {
        try await serving(MemoryBackend(size: Self.size)) { uri in
            var configuration = NBDClient.Configuration()
            configuration.connections = 3
            try await NBDClient.withClient(uri, configuration: configuration) { client in
                #expect(try await client.info.canResize)
                // Requests in flight on every connection while the resize waits its turn.
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for index in 0..<24 {
                        group.addTask {
                            try await client.write(self.pattern(4096, seed: UInt8(index)), at: UInt64(index) * 4096)
                        }
                    }
                    group.addTask { try await client.resize(to: 4 * Self.size) }
                    try await group.waitForAll()
                }
                #expect(try await client.size == 4 * Self.size)
                // Past the old end, on whichever connections the requests land.
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for index in 0..<24 {
                        group.addTask {
                            let offset = 2 * Self.size + UInt64(index) * 4096
                            try await client.write(self.pattern(4096, seed: UInt8(index)), at: offset)
                            #expect(try await client.read(at: offset, length: 4096) == self.pattern(4096, seed: UInt8(index)))
                        }
                    }
                    try await group.waitForAll()
                }
                #expect(try await client.read(at: 4096, length: 4096) == pattern(4096, seed: 1))
            }
        }
    }

    @Test func refusalsNameWhatWasWrong() async throws {
        // Not resizable: refused before anything is sent.
        try await serving(MemoryBackend(size: Self.size), resizable: false) { uri in
            let export = try await NBDExport.connect(to: uri)
            #expect(!export.info.canResize)
            do {
                try await export.resize(to: 2 * Self.size)
                Issue.record("a resize was sent without NBD_FLAG_SEND_RESIZE")
            } catch let error as NBDError {
                #expect(error.code == .notAdvertised && error.message.contains("NBD_FLAG_SEND_RESIZE"))
            }
            await export.disconnect()
        }
        // Beyond what the backend can hold: ENOSPC, and the size stays.
        try await serving(MemoryBackend(size: Self.size, maximumSize: 2 * Self.size)) { uri in
            let export = try await NBDExport.connect(to: uri)
            do {
                try await export.resize(to: 4 * Self.size)
                Issue.record("grew past the backend's maximum")
            } catch let error as NBDError {
                #expect(error.serverErrno == .ENOSPC)
            }
            #expect(export.size == Self.size)
            try await export.resize(to: 2 * Self.size)
            #expect(export.size == 2 * Self.size)
            await export.disconnect()
        }
    }

    @Test func aFileGrowsAndShrinksWithItsExport() async throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("nbd-resize-\(UUID().uuidString.prefix(8)).img").path
        _ = FileManager.default.createFile(atPath: path, contents: Data(repeating: 7, count: Int(Self.size)))
        defer { try? FileManager.default.removeItem(atPath: path) }
        func length() throws -> UInt64 { (try FileManager.default.attributesOfItem(atPath: path)[.size] as? NSNumber)?.uint64Value ?? 0 }
        try await serving(try FileBackend(path: path)) { uri in
            let export = try await NBDExport.connect(to: uri)
            try await export.resize(to: 2 * Self.size)
            #expect(try length() == 2 * Self.size)
            #expect(try await export.read(at: Self.size - 4, length: 8) == ByteBuffer(bytes: [7, 7, 7, 7, 0, 0, 0, 0]))
            try await export.resize(to: Self.size / 4)
            #expect(try length() == Self.size / 4)
            await export.disconnect()
        }
    }

    /// "a block device cannot, and says so with EPERM": a loop device over a file.
    @Test func aBlockDeviceRefusesWithEPERM() async throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("nbd-resize-\(UUID().uuidString.prefix(8)).img").path
        _ = FileManager.default.createFile(atPath: path, contents: Data(count: Int(Self.size)))
        defer { try? FileManager.default.removeItem(atPath: path) }
        let device = try Self.run("/usr/sbin/losetup", ["--find", "--show", path]).trimmingCharacters(in: .whitespacesAndNewlines)
        defer { _ = try? Self.run("/usr/sbin/losetup", ["--detach", device]) }
        try await serving(try FileBackend(path: device)) { uri in
            let export = try await NBDExport.connect(to: uri)
            do {
                try await export.resize(to: 2 * Self.size)
                Issue.record("a block device changed size")
            } catch let error as NBDError {
                #expect(error.serverErrno == .EPERM && error.serverMessage == "a block device cannot change size")
            }
            #expect(export.size == Self.size)
            await export.disconnect()
        }
    }

    static func run(_ tool: String, _ arguments: [String]) throws -> String {
        let result = try runProcess(tool, arguments)
        guard result.status == 0 else {
            throw NBDError.invalidArgument(
                "\(tool) \(arguments.joined(separator: " ")) failed (util-linux's losetup needs root and loop devices): \(result.error)"
            )
        }
        return String(decoding: result.output, as: UTF8.self)
    }
}
