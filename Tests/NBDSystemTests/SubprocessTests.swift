import NBDSystem
import TestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A server started for a connection is stopped by its pid: never once that pid is free for
/// another process to take.
@Suite("Subprocess")
struct SubprocessTests {
    /// Once `exitStatus()` has reaped the process, `stop()` sends no signal.
    @Test func aReapedProcessIsNeverSignalled() async throws {
        let process = try Subprocess(["true"], descriptors: [])
        try await waitUntil("true to exit", seen: "still running") { process.exitStatus() != nil }
        #expect(process.exitStatus() == 0)
        #expect(process.stop() == false)
    }

    @Test func aRunningProcessIsStoppedAndReapedOnce() throws {
        let process = try Subprocess(["sleep", "60"], descriptors: [])
        #expect(process.exitStatus() == nil)
        #expect(process.stop() == true)
        let status = try #require(process.exitStatus())
        #expect(status & 0x7f == SIGTERM, "wait status \(status)")
        #expect(process.stop() == false)
    }
}
