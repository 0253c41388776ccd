import Foundation
import NBD
import NBDCopy
import NIOConcurrencyHelpers
import NIOCore
import TestSupport
import Testing

/// A server whose answered writes live in memory until a flush (nbdkit's cache filter in
/// write-back mode, as any server with a volatile cache or a host that crashes), killed and
/// started again mid-job: what it had answered and not flushed is gone with it, and the client
/// sends it again from its replay log. The result is checked by content, on disk.
extension ClientReconnectTests {
    /// A write-back nbdkit serving `disk.raw` at `rate`, the data to write (from a printed
    /// seed), and a client of it with `connections` and a reconnect delay of 20 s.
    func writeBackJob(
        _ server: ServerProcess,
        connections: Int,
        rate: String = "32M"
    ) async throws -> (file: String, nbdkit: Restartable, data: ByteBuffer, seed: UInt64, client: NBDClient) {
        let (file, nbdkit) = try await slowFileServer(server, "disk.raw", rate: rate, writeBack: true)
        let seed = testSeed()
        var generator = SeededGenerator(seed: seed)
        let data = pattern(Self.size, seed: UInt8.random(in: 1...255, using: &generator))
        let client = NBDClient(
            NBDURI(socket: nbdkit.socket),
            configuration: configuration(connections: connections, reconnectDelay: .seconds(20))
        )
        return (file, nbdkit, data, seed, client)
    }

    @Test(arguments: [1, 4])
    func writesAnsweredButNotFlushedSurviveARestart(connections: Int) async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let (file, nbdkit, data, seed, client) = try await writeBackJob(server, connections: connections)
        let events = EventLog(client)
        let pieces = Pieces()
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await client.run() }
            async let writing: Void = writeAll(data, to: client, pieces: pieces)
            // Killed with answered writes in its cache, none of them flushed.
            try await connected(client, connections)
            try await pieces.progressed(by: 8)
            try await nbdkit.restart(after: .milliseconds(500))
            try await writing
            try await client.flush()
            group.cancelAll()
        }
        let replayed = events.all.compactMap { if case .replayed(let requests, _) = $0 { requests } else { nil } }
        #expect(replayed.reduce(0, +) > 0, "seed \(seed): \(events.all)")
        #expect(client.replays > 0)
        #expect(try Data(contentsOf: URL(fileURLWithPath: file)) == Data(data.readableBytesView), "seed \(seed): not what was written")
    }

    /// The copy engine through clients of the caller's own (``NBDEndpoint`` over any
    /// `NBDExportAccess`), both sides on write-back servers, each killed once mid-copy: the
    /// exact source on disk, the destination's client replayed what its server lost, and the
    /// progress said while the copy waited for a connection.
    @Test(arguments: [1, 4])
    func aLibraryCopyBetweenWriteBackServersBothRestarted(connections: Int) async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let seed = testSeed()
        var generator = SeededGenerator(seed: seed)
        let data = pattern(Self.size, seed: UInt8.random(in: 1...255, using: &generator))
        try Data(data.readableBytesView).write(to: URL(fileURLWithPath: server.path("source.raw")))
        let (_, sourceServer) = try await slowFileServer(server, "source.raw", rate: "32M", writeBack: true)
        let (file, destinationServer) = try await slowFileServer(server, "destination.raw", rate: "32M", writeBack: true)
        let reader = NBDClient(
            NBDURI(socket: sourceServer.socket),
            configuration: configuration(connections: connections, reconnectDelay: .seconds(20))
        )
        let writer = NBDClient(
            NBDURI(socket: destinationServer.socket),
            configuration: configuration(connections: connections, reconnectDelay: .seconds(20))
        )
        let progress = CopyProgress(total: UInt64(Self.size))
        let options = {
            var options = CopyOptions()
            options.flush = true
            // Reads stay close behind the writes, so that the source's restart lands mid-copy.
            options.memory = 1 << 20
            return options
        }()
        let (report, sawReconnecting) = try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await reader.run() }
            group.addTask { try await writer.run() }
            try await connected(reader, connections)
            try await connected(writer, connections)
            let source = try await NBDEndpoint(reader)
            let destination = try await NBDEndpoint(writer)
            async let copied = copy(from: source, to: destination, options: options, progress: progress)
            async let sawReconnecting = progress.updates.contains { $0.reconnecting }
            for side in [destinationServer, sourceServer] {
                let start = progress.snapshot.done
                try await waitUntil("the copy to do 2 MiB more", seen: "\(progress.snapshot.done - start) bytes") {
                    progress.snapshot.done - start >= 2 << 20
                }
                #expect(progress.snapshot.done < UInt64(Self.size), "the copy was over before the kill")
                try await side.restart(after: .seconds(1))
            }
            let result = (try await copied, await sawReconnecting)
            // The endpoints leave the caller's clients running.
            #expect(try await reader.read(at: 0, length: 4096) == data.getSlice(at: 0, length: 4096))
            #expect(try await writer.read(at: 0, length: 4096) == data.getSlice(at: 0, length: 4096))
            group.cancelAll()
            return result
        }
        #expect(report.bytes == UInt64(Self.size) && !report.stopped)
        #expect(writer.replays > 0, "seed \(seed)")
        #expect(sawReconnecting, "no progress update said the copy was waiting for a connection")
        #expect(try Data(contentsOf: URL(fileURLWithPath: file)) == Data(data.readableBytesView), "seed \(seed): not the source")
    }

    /// `nbd copy --flush` onto the write-back server killed mid-copy: exit 0 and the exact
    /// source on disk (qemu-img and nbdcopy lose blocks here, with exit 0).
    @Test func nbdCopyOntoAWriteBackServerKilledMidCopy() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let (file, nbdkit) = try await slowFileServer(server, "destination.raw", rate: "32M", writeBack: true)
        let data = pattern(Self.size, seed: 33)
        let source = server.path("source.raw")
        try Data(data.readableBytesView).write(to: URL(fileURLWithPath: source))
        let copy = Process()
        copy.executableURL = URL(fileURLWithPath: nbdTool)
        copy.arguments = ["copy", "--reconnect-delay", "20", "--flush", source, NBDURI(socket: nbdkit.socket).description]
        let errors = Pipe()
        copy.standardError = errors
        copy.standardOutput = FileHandle.nullDevice
        try copy.run()
        try await waitUntil("nbd copy to write 4 MiB", seen: "\(bytesMoved(by: copy.processIdentifier))") {
            guard copy.isRunning else { throw InteropError("the copy ended before the kill") }
            return bytesMoved(by: copy.processIdentifier).written >= 4 << 20
        }
        try await nbdkit.restart(after: .milliseconds(500))
        let said = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        try await copy.exited()
        #expect(copy.terminationStatus == 0, "\(said)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: file)) == Data(data.readableBytesView), "\(said)")
    }

    /// With the replay window off nothing is sent again, and the flush after the restart says
    /// which ranges may be lost instead of succeeding; the next flush succeeds.
    @Test func withTheWindowOffTheFlushAfterARestartFails() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let (_, nbdkit) = try await slowFileServer(server, "disk.raw", rate: "32M", writeBack: true)
        var configuration = configuration(connections: 1, reconnectDelay: .seconds(20))
        configuration.replayWindow = 0
        let client = NBDClient(NBDURI(socket: nbdkit.socket), configuration: configuration)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await client.run() }
            try await client.write(pattern(1 << 20, seed: 3), at: 4 << 20)
            try await nbdkit.restart(after: .milliseconds(200))
            await #expect {
                try await client.flush()
            } throws: { error in
                guard let error = error as? NBDError else { return false }
                return error.code == .writesInDoubt && error.message.contains("bytes 4194304-5242879")
            }
            try await client.flush()
            group.cancelAll()
        }
    }
}
