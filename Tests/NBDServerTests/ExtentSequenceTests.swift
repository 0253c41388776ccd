import Foundation
import NBD
@_spi(NBDMachines) import NBDCore
import NBDServer
import NIOConcurrencyHelpers
import NIOCore
import Testing

/// `NBDExport.extents(of:in:)` against a server that answers block status a little at a time.
@Suite("Extent walker")
struct ExtentSequenceTests {
    /// Answers each block status with one extent up to the next 4 KiB boundary, data and holes
    /// in turn, the last one running past the export's end (as the spec allows); counts the calls.
    struct ShortAnswers: NBDServerBackend {
        let memory: MemoryBackend
        let calls = NIOLockedValueBox(0)
        var size: UInt64 { memory.size }
        var isReadOnly: Bool { false }
        var flushCoversAllConnections: Bool { true }
        var zeroIsFast: Bool { true }
        func read(at offset: UInt64, length: Int) async throws -> ByteBuffer { try await memory.read(at: offset, length: length) }
        func write(_ data: ByteBuffer, at offset: UInt64, fua: Bool) async throws { try await memory.write(data, at: offset, fua: fua) }
        func flush() async throws {}
        func trim(at offset: UInt64, length: UInt64) async throws {}
        func zero(at offset: UInt64, length: UInt64, noHole: Bool) async throws {}
        func extents(at offset: UInt64, length: UInt64) async throws -> [BlockDescriptor] {
            calls.withLockedValue { $0 += 1 }
            let block = offset / 4096
            return [BlockDescriptor(length: 4096 - offset % 4096, flags: block % 2 == 0 ? 0 : 3)]
        }
    }

    func withExport(
        size: UInt64,
        metaContexts: [NBDMetaContext] = [.baseAllocation],
        _ body: (NBDExport, ShortAnswers) async throws -> Void
    ) async throws {
        let backend = ShortAnswers(memory: MemoryBackend(size: size))
        let socket = FileManager.default.temporaryDirectory.appendingPathComponent("nbd-walk-\(UUID().uuidString.prefix(8)).sock").path
        let server = try await NBDServer.start(exports: [NBDServerExport(backend: backend)], on: .unix(path: socket))
        var configuration = NBDClientConfiguration()
        configuration.metaContexts = metaContexts
        do {
            let export = try await NBDExport.connect(to: NBDURI(socket: socket), configuration: configuration)
            try await body(export, backend)
            await export.disconnect()
        } catch {
            await server.shutdown()
            throw error
        }
        await server.shutdown()
    }

    func collect(_ extents: NBDExtentSequence) async throws -> [String] {
        var seen: [String] = []
        for try await extent in extents { seen.append("\(extent)") }
        return seen
    }

    @Test func walksFromWhereEachAnswerEndedAndClipsToTheExport() async throws {
        try await withExport(size: 10000) { export, backend in
            let whole = try await collect(export.extents())
            #expect(whole == ["0..<4096: data", "4096..<8192: hole, zero", "8192..<10000: data"])
            #expect(backend.calls.withLockedValue { $0 } == 3)
        }
    }

    @Test func aRangeIsWalkedFromItsStartAndClippedToItsEnd() async throws {
        try await withExport(size: 1 << 20) { export, backend in
            let part = try await collect(export.extents(in: 5000..<9000))
            #expect(part == ["5000..<8192: hole, zero", "8192..<9000: data"])
            let empty = try await collect(export.extents(in: 7000..<7000))
            #expect(empty.isEmpty)
            #expect(backend.calls.withLockedValue { $0 } == 2)
        }
    }

    @Test func aContextNotNegotiatedFailsWithoutAsking() async throws {
        try await withExport(size: 1 << 20, metaContexts: []) { export, backend in
            #expect(!export.hasMetaContext(.baseAllocation))
            await #expect(
                performing: { _ = try await collect(export.extents()) },
                throws: { ($0 as? NBDError)?.code == .notAdvertised }
            )
            #expect(backend.calls.withLockedValue { $0 } == 0)
        }
    }
}
