import Foundation
import NBD
import TestSupport
import Testing

/// The `nbd` tool and the library against a server that stops answering or dies: they fail
/// promptly, saying what happened in words, instead of hanging for ever.
@Suite("A frozen or killed server", .serialized)
struct FrozenServerTests {
    /// Runs `nbd` with `arguments`, does `freeze` once it has read `bytes` (the copy is under
    /// way), then `interrupt`; its status (-1 when it still ran 30 s later, far past any timeout
    /// under test), error text, and the time from the freeze to its exit.
    func runNBD(
        _ arguments: [String],
        freezingAfterReading bytes: Int = 0,
        _ freeze: () -> Void = {},
        interrupting interrupt: (Process) async throws -> Void = { _ in }
    ) async throws -> (status: Int32, error: String, afterFreeze: Duration) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: nbdTool)
        process.arguments = arguments
        let errors = Pipe()
        process.standardError = errors
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        try await waitUntil("nbd to read \(bytes) bytes", seen: "\(bytesMoved(by: process.processIdentifier).read)") {
            guard process.isRunning else { throw InteropError("nbd ended before the server froze") }
            return bytesMoved(by: process.processIdentifier).read >= bytes
        }
        freeze()
        let frozenAt = ContinuousClock.now
        try await interrupt(process)
        let ended = (try? await process.exited()) != nil
        let afterFreeze = ContinuousClock.now - frozenAt
        if !ended { kill(process.processIdentifier, SIGKILL) }
        let text = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        return (ended ? process.terminationStatus : -1, text, afterFreeze)
    }

    @Test func copyFromAServerStoppedMidCopyExitsWithinTheTimeout() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let (nbdkit, uri) = try await server.slowNBDKit(["pattern", "4G"])
        let result = try await runNBD(
            ["copy", "--timeout", "2", uri, "null:"],
            freezingAfterReading: 4 << 20
        ) {
            kill(nbdkit.processIdentifier, SIGSTOP)
        }
        kill(nbdkit.processIdentifier, SIGCONT)
        #expect(result.status == 1)
        #expect(result.error.contains("the server did not answer NBD_CMD_READ") && result.error.contains("within 2 s"), "\(result.error)")
        // Within the timeout, with room for a busy machine; not the 30 s of the frozen server.
        #expect(result.afterFreeze < within(.seconds(8)), "exited \(result.afterFreeze) after the freeze")
        #expect(result.error.split(separator: "\n").count == 1, "\(result.error)")
    }

    @Test func infoMapOnAServerThatNeverAnswersBlockStatusExitsWithinTheTimeout() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(["--filter=delay", "memory", "16M", "delay-extents=60"])
        let result = try await runNBD(["info", "--map", "--timeout", "1", uri.description])
        #expect(result.status == 1)
        #expect(result.error.contains("did not answer NBD_CMD_BLOCK_STATUS") && result.error.contains("within 1 s"), "\(result.error)")
        #expect(result.afterFreeze < within(.seconds(7)), "exited after \(result.afterFreeze)")
    }

    @Test func dumpOnAServerThatNeverAnswersReadsExitsWithinTheTimeout() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(["--filter=delay", "pattern", "16M", "delay-read=60"])
        let result = try await runNBD(["dump", "--timeout", "1.5", uri.description])
        #expect(result.status == 1)
        #expect(result.error.contains("did not answer NBD_CMD_READ") && result.error.contains("within 1.5 s"), "\(result.error)")
        #expect(result.afterFreeze < within(.seconds(7.5)), "exited after \(result.afterFreeze)")
    }

    @Test func timeoutZeroWaitsAndBadTimeoutsAreRefused() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(["--filter=delay", "pattern", "1M", "delay-read=3"])
        // A slow server is not a frozen one: with --timeout 0 the read just takes its time.
        let slow = try await runNBD(["dump", "--timeout", "0", "--length", "16", uri.description])
        #expect(slow.status == 0, "\(slow.error)")
        #expect(slow.afterFreeze >= .seconds(2))
        for bad in ["-1", "soon"] {
            let refused = try await runNBD(["dump", "--timeout", bad, uri.description])
            #expect(refused.status != 0 && refused.error.contains("--timeout"), "\(refused.error)")
        }
    }

    @Test func killingTheServerFailsSixtyFourRequestsInFlightAtOnceInWords() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let socket = server.path("doomed.sock")
        // The log filter, outside the delay, writes a line as each read arrives.
        let log = server.path("reads.log")
        let nbdkit = try await server.start(
            "nbdkit",
            ["--foreground", "--unix", socket, "--filter=log", "--filter=delay", "pattern", "64M", "delay-read=30", "logfile=\(log)"],
            waitFor: socket
        )
        let export = try await NBDExport.connect(to: NBDURI(socket: socket))
        let reads = Task {
            await withTaskGroup(of: (any Error)?.self) { group in
                for index in 0..<64 {
                    group.addTask {
                        do {
                            _ = try await export.read(at: UInt64(index) << 16, length: 65536)
                            return nil
                        } catch {
                            return error
                        }
                    }
                }
                return await group.reduce(into: [(any Error)?]()) { $0.append($1) }
            }
        }
        try await waitUntil(file: log, holds: " Read ")
        let killedAt = ContinuousClock.now
        kill(nbdkit.processIdentifier, SIGKILL)
        let errors = await reads.value
        // At once: not after the 30 s the reads would take.
        #expect(ContinuousClock.now - killedAt < within(.seconds(5)))
        #expect(errors.count == 64)
        for error in errors {
            let error = try #require(error as? NBDError)
            #expect(error.code == .connectionClosed)
            let text = "\(error)"
            #expect(
                text.hasPrefix("the server closed the connection") || text.contains("the server reset the connection (ECONNRESET)"),
                "\(text)"
            )
            #expect(!text.contains("descriptor") && !text.contains("errno:"), "\(text)")
            #expect(text.filter { $0 == "(" }.count == text.filter { $0 == ")" }.count, "\(text)")
        }
    }

    @Test func ctrlCTwiceEndsACopyFromAFrozenServerAtOnce() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let (nbdkit, uri) = try await server.slowNBDKit(["pattern", "4G"])
        let result = try await runNBD(["copy", "--timeout", "0", uri, "null:"], freezingAfterReading: 4 << 20) {
            kill(nbdkit.processIdentifier, SIGSTOP)
        } interrupting: { process in
            // The first Ctrl-C waits for the requests in flight, which never come; the second does
            // not. Sent until the process ends: two sent at once may arrive as one.
            try await waitUntil("nbd copy to end on Ctrl-C", seen: "still running") {
                guard process.isRunning else { return true }
                kill(process.processIdentifier, SIGINT)
                return false
            }
        }
        kill(nbdkit.processIdentifier, SIGCONT)
        #expect(result.status == 130)
        #expect(result.error.contains("interrupted again"), "\(result.error)")
        #expect(result.afterFreeze < within(.seconds(5)), "exited \(result.afterFreeze) after the freeze")
    }
}
