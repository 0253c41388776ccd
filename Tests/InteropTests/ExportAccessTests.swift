import Foundation
import NBD
import NBDCopy
import NIOCore
import TestSupport
import Testing

/// NBDCopy through an export of the caller's own: any `NBDExportAccess`, here one `NBDExport`
/// connection to nbdkit, as source and as destination. The copy reads and writes through it,
/// and leaves it open.
@Suite("NBDCopy through the caller's NBDExport")
struct ExportAccessTests {
    @Test func aCopyGoesThroughOneExportConnectionAndLeavesItOpen() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let size = 4 << 20
        let seed = testSeed()
        var generator = SeededGenerator(seed: seed)
        let data = pattern(size, seed: UInt8.random(in: 1...255, using: &generator))
        let file = server.path("source.raw")
        try Data(data.readableBytesView).write(to: URL(fileURLWithPath: file))
        let uri = try await server.nbdkit(["memory", "\(size)"])
        let export = try await NBDExport.connect(to: uri)
        let destination = try await NBDEndpoint(export)
        #expect(destination.connections == 1)
        var options = CopyOptions()
        options.flush = true
        let report = try await copy(from: try FileEndpoint.source(file), to: destination, options: options)
        #expect(report.bytes == UInt64(size))
        await destination.close()
        // Still open: read back through it, and copied back out through it as a source.
        #expect(try await export.read(at: 0, length: UInt64(size)) == data, "seed \(seed)")
        let back = server.path("back.raw")
        _ = try await copy(from: try await NBDEndpoint(export), to: try FileEndpoint.destination(back, size: UInt64(size)))
        #expect(try Data(contentsOf: URL(fileURLWithPath: back)) == Data(data.readableBytesView), "seed \(seed)")
        await export.close()
    }
}
