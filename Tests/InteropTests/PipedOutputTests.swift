import Foundation
import NBD
import TestSupport
import Testing

/// Every printing command piped into a reader that goes away (`| head -1`, `| true`): no crash
/// text, and exit 0, or a one-line message where stopping early loses data (a copy to stdout).
@Suite("Output into a closed pipe", .serialized)
struct PipedOutputTests {
    /// Runs `nbd ARGUMENTS | reader` in bash; returns nbd's own exit status and standard error.
    func piped(_ arguments: [String], into reader: String) throws -> (status: Int32, error: String) {
        let quoted = ([nbdTool] + arguments).map { "'\($0)'" }.joined(separator: " ")
        let command = "\(quoted) | \(reader) >/dev/null; echo \"status ${PIPESTATUS[0]}\" >&2"
        let result = try runProcess("/bin/bash", ["-c", command])
        var error = result.error
        let last = error.split(separator: "\n").last.map(String.init) ?? ""
        error.removeLast(last.count + 1)
        return (Int32(last.dropFirst("status ".count)) ?? -1, error)
    }

    @Test func eachPrintingCommandStopsQuietly() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let pattern = try await server.nbdkit(["pattern", "64M"]).description
        // Thousands of extents: more text than a pipe holds.
        let sparse = try await server.nbdkit(["sparse-random", "1G", "seed=3"]).description
        for (arguments, reader) in [
            (["dump", pattern], "head -1"), (["info", "--map", sparse], "head -1"), (["info", "--json", pattern], "true"),
            (["info", pattern], "true"), (["checksum", pattern], "true"),
        ] {
            let result = try piped(arguments, into: reader)
            #expect(result.status == 0, "\(arguments) | \(reader): \(result.error)")
            #expect(result.error.isEmpty, "\(arguments) | \(reader): \(result.error)")
        }
        // A copy that cannot finish is a failure, in one line.
        let copy = try piped(["copy", pattern, "-"], into: "head -1")
        #expect(copy.status == 1)
        #expect(copy.error.hasPrefix("nbd: writing to standard output failed"), "\(copy.error)")
        #expect(copy.error.filter { $0 == "\n" }.count == 1, "\(copy.error)")
    }
}
