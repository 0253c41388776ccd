import Foundation
import NBD
import TestSupport
import Testing

/// `nbd-example`, the README's first command, walks every phase and says what it saw.
@Suite("nbd-example", .serialized)
struct ExampleProgramTests {
    static let example = URL(fileURLWithPath: nbdTool).deletingLastPathComponent().appendingPathComponent("nbd-example").path

    @Test func walksTheBuiltInServerAndSaysWhatItSaw() throws {
        let result = try runProcess(Self.example, [])
        let output = String(decoding: result.output, as: UTF8.self)
        #expect(result.status == 0, "\(result.error)")
        #expect(output.contains("1. handshake done, the server offers NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES"))
        #expect(output.contains("     demo: a 64 MiB disk in memory"))
        #expect(output.contains("   demo has 67108864 bytes, writable"))
        // Both sides speak extended headers, so that is what they agree on.
        #expect(output.contains("   extended headers, metadata contexts: base:allocation"))
        #expect(output.contains("     0..<1048576: data\n     1048576..<4194304: hole, zero\n"))
        #expect(output.hasSuffix("5. disconnected\nall steps passed\n"))
        // Prose, not Swift values.
        #expect(!output.contains("[\"") && !output.contains("Optional(") && !output.contains("rawValue"))
    }

    @Test func walksAnExportItIsGiven() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(["memory", "16M"])
        let result = try runProcess(Self.example, [uri.description])
        let output = String(decoding: result.output, as: UTF8.self)
        #expect(result.status == 0, "\(result.error)")
        #expect(output.contains("the default export has 16777216 bytes, writable"))
        // nbdkit 1.32 has no extended headers: the example falls back, and says so.
        #expect(output.contains("   structured replies, metadata contexts: base:allocation"), "\(output)")
        #expect(output.hasSuffix("all steps passed\n"))
    }

    @Test func aServerThatIsNotThereFailsWithOneLine() throws {
        let result = try runProcess(Self.example, ["nbd+unix:///?socket=/nonexistent/nbd.sock"])
        #expect(result.status == 1)
        #expect(result.error.hasPrefix("nbd-example: ") && result.error.filter { $0 == "\n" }.count == 1, "\(result.error)")
    }
}
