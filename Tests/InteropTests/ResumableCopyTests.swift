import Foundation
import NBD
import TestSupport
import Testing

/// `nbd copy --resume FILE`: a copy interrupted by Ctrl-C, by its source's death or by its
/// destination's, and started again with the same journal, reads only what the journal lacks
/// and ends with the source's bytes.
@Suite("nbd copy --resume (journalled, resumable copies)", .serialized)
struct ResumableCopyTests {
    static let size = 32 << 20

    /// Bytes the journal at `path` records as copied, or nil when there is none.
    func journalledBytes(_ path: String) -> Int? {
        guard let data = FileManager.default.contents(atPath: path),
            let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
            let done = object["done"] as? [[Int]]
        else { return nil }
        return done.reduce(0) { $0 + $1[1] - $1[0] }
    }

    /// Bytes nbdkit's log filter saw read.
    func nbdkitBytesRead(_ log: String) -> Int {
        let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        return text.split(separator: "\n").filter { $0.contains(" Read id=") }
            .compactMap { $0.split(separator: "count=0x").last?.split(separator: " ").first.flatMap { Int($0, radix: 16) } }
            .reduce(0, +)
    }

    /// Runs `nbd ARGUMENTS`; once `journal` records at least `bytes`, `interrupt` is called.
    /// Returns the exit status and standard error.
    func interrupted(
        _ arguments: [String],
        journal: String,
        after bytes: Int = 2 << 20,
        interrupt: (Process) -> Void
    ) async throws -> (status: Int32, error: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: nbdTool)
        process.arguments = arguments
        let errors = Pipe()
        process.standardError = errors
        try process.run()
        try await waitUntil("the journal \(journal) to record \(bytes) bytes", seen: "\(journalledBytes(journal) ?? 0)") {
            guard process.isRunning else { throw InteropError("the copy ended before it was interrupted") }
            return (journalledBytes(journal) ?? 0) >= bytes
        }
        interrupt(process)
        let message = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        try await process.exited()
        return (process.terminationStatus, message)
    }

    /// Copies with a journal until it records some bytes, then kills `victim` (the source's
    /// server or the destination's): the copy fails, says how to go on, and leaves a journal of
    /// part of the copy. Returns the bytes it records.
    func copyKilling(_ victim: Process, from source: String, to destination: String, journal: String) async throws -> Int {
        let first = try await interrupted(
            slowCopy(source, destination, journal: journal),
            journal: journal
        ) { _ in
            kill(victim.processIdentifier, SIGKILL)
        }
        #expect(first.status == 1, "\(first.error)")
        #expect(first.error.contains("run the same command again"), "\(first.error)")
        let done = try #require(journalledBytes(journal))
        #expect(done > 0 && done < Self.size)
        try await victim.exited()
        return done
    }

    /// A first run slow enough to be interrupted: one connection, two requests in flight.
    func slowCopy(_ source: String, _ destination: String, journal: String) -> [String] {
        ["copy", "--resume", journal, "--source-state", "snapshot-1", "--connections", "1", "--requests", "2", source, destination]
    }

    /// Runs the copy again with its journal, which holds `done` bytes: it succeeds, reads from
    /// the nbdkit source logging to `log` exactly what the journal lacked, and leaves the file
    /// `copy` with the bytes nbdcopy reads from the source.
    func expectResumeCopiesTheRest(
        _ server: ServerProcess,
        from source: String,
        to destination: String,
        landingIn copy: String,
        journal: String,
        done: Int,
        log: String
    ) throws {
        let before = nbdkitBytesRead(log)
        let second = try runNBD(["copy", "--resume", journal, "--source-state", "snapshot-1", source, destination])
        #expect(second.status == 0, "\(second.error)")
        #expect(nbdkitBytesRead(log) - before == Self.size - done)
        _ = try server.run("nbdcopy", [source, server.path("expected.raw")])
        #expect(try sameContents(copy, server.path("expected.raw")))
    }

    /// A slow nbdkit pattern source (two requests of 256 KiB every 100 ms: 32 MiB take six
    /// seconds), with its reads logged. Trixie's nbdkit: bookworm's (1.32) aborts, one time in
    /// ten, when a client vanishes with two replies under way (`connections.c:402:
    /// raw_send_socket: Assertion 'sock >= 0' failed`: one thread closes the socket on EPIPE
    /// while another sends), and these tests kill a copy and then resume from the same server.
    func slowPattern(_ server: ServerProcess, log: String) async throws -> String {
        try await server.nbdkit(
            ["--filter=log", "--filter=delay", "pattern", "\(Self.size)", "delay-read=100ms", "logfile=\(log)"],
            tool: "trixie:nbdkit"
        ).description
    }

    @Test func ctrlCThenResumeCopiesOnlyTheRest() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let log = server.path("reads.log")
        let source = try await slowPattern(server, log: log)
        let journal = server.path("copy.journal")
        let destination = server.path("copy.raw")
        let first = try await interrupted(
            slowCopy(source, destination, journal: journal),
            journal: journal
        ) { kill($0.processIdentifier, SIGINT) }
        #expect(first.status == 130, "\(first.error)")
        #expect(first.error.contains("nbd: interrupted"), "\(first.error)")
        #expect(first.error.contains("run the same command again"), "\(first.error)")
        let done = try #require(journalledBytes(journal))
        #expect(done > 0 && done < Self.size)
        // Replaced by rename: nothing is left beside it. A leftover from a crash is no matter.
        #expect(!FileManager.default.fileExists(atPath: journal + ".new"))
        _ = FileManager.default.createFile(atPath: journal + ".new", contents: Data("half a journal".utf8))

        let before = nbdkitBytesRead(log)
        let second = try runNBD(["copy", "--resume", journal, "--source-state", "snapshot-1", "--verify", "--blkhash", source, destination])
        #expect(second.status == 0, "\(second.error)")
        #expect(second.error.contains("resuming: \(done) of \(Self.size) bytes were copied already"), "\(second.error)")
        #expect(second.error.contains("nbd: verified"), "\(second.error)")
        // What the journal lacked, then the whole source once more for the blkhash.
        #expect(nbdkitBytesRead(log) - before == Self.size - done + Self.size)
        #expect(journalledBytes(journal) == nil, "a complete copy leaves no journal")

        _ = try server.run("nbdcopy", [source, server.path("expected.raw")])
        #expect(try sameContents(destination, server.path("expected.raw")))
        let checksum = try runNBD(["checksum", "--blkhash", destination])
        #expect(checksum.output.split(separator: " ").first == second.output.split(separator: "\n").first)
    }

    /// As when the machine stops: nbd copy killed with SIGKILL, so there is no last checkpoint.
    /// The journal is the last one written whole, and the next run goes on from it.
    @Test func aKilledCopyThenResumeCopiesOnlyTheRest() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let log = server.path("reads.log")
        let source = try await slowPattern(server, log: log)
        let journal = server.path("copy.journal")
        let destination = server.path("copy.raw")
        _ = try await interrupted(
            slowCopy(source, destination, journal: journal),
            journal: journal,
            after: 4 << 20
        ) { kill($0.processIdentifier, SIGKILL) }
        let done = try #require(journalledBytes(journal))
        #expect(done >= 4 << 20 && done < Self.size)
        try expectResumeCopiesTheRest(server, from: source, to: destination, landingIn: destination, journal: journal, done: done, log: log)
    }

    /// The same copy started again while it runs is refused, and leaves the journal alone.
    @Test func aJournalServesOneCopyAtATime() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let source = try await slowPattern(server, log: server.path("reads.log"))
        let journal = server.path("copy.journal")
        let destination = server.path("copy.raw")
        let arguments = slowCopy(source, destination, journal: journal)
        var second: (status: Int32, output: String, error: String)?
        let first = try await interrupted(arguments, journal: journal) { process in
            second = try? runNBD(arguments)
            kill(process.processIdentifier, SIGINT)
        }
        #expect(first.status == 130, "\(first.error)")
        let refused = try #require(second)
        #expect(refused.status == 1)
        #expect(refused.error == "nbd: another nbd copy is using the journal \(journal) (it holds \(journal).lock)\n", "\(refused.error)")
        #expect(journalledBytes(journal) != nil, "the first run's journal is still there")
        // Once the first run is gone, the lock is free: the copy completes and tidies up.
        let third = try runNBD(["copy", "--resume", journal, "--source-state", "snapshot-1", source, destination])
        #expect(third.status == 0, "\(third.error)")
        #expect(!FileManager.default.fileExists(atPath: journal) && !FileManager.default.fileExists(atPath: journal + ".lock"))
    }

    @Test func aKilledSourceThenResumeCopiesOnlyTheRest() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let data = server.path("source.raw")
        try Data(pattern(Self.size, seed: 7).readableBytesView).write(to: URL(fileURLWithPath: data))
        let socket = server.path("q.sock")
        func qemuNBD(trace: String) async throws -> Process {
            try? FileManager.default.removeItem(atPath: socket)
            return try await server.start(
                "qemu-nbd",
                ["-k", socket, "-t", "-r", "-f", "raw", "--trace", "enable=nbd_co_send_structured_read*,file=\(trace)", data],
                waitFor: socket
            )
        }
        let qemu = try await qemuNBD(trace: server.path("first.trace"))
        // The destination is the slow side: nbdkit's file plugin, each write 100 ms late (trixie's,
        // as in slowPattern: the copy ends with writes under way when its source dies).
        let copy = server.path("copy.raw")
        _ = try server.run("truncate", ["-s", "\(Self.size)", copy])
        let destination = try await server.nbdkit(["--filter=delay", "file", copy, "delay-write=100ms"], tool: "trixie:nbdkit").description
        let source = NBDURI(socket: socket).description
        let journal = server.path("copy.journal")
        let done = try await copyKilling(qemu, from: source, to: destination, journal: journal)
        let trace = server.path("second.trace")
        _ = try await qemuNBD(trace: trace)
        let second = try runNBD(["copy", "--resume", journal, "--source-state", "snapshot-1", source, destination])
        #expect(second.status == 0, "\(second.error)")
        #expect(qemuBytesSent(trace) == Self.size - done)
        #expect(try sameContents(copy, data))
    }

    @Test func aKilledDestinationThenResumeCopiesOnlyTheRest() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let log = server.path("reads.log")
        let source = try await slowPattern(server, log: log)
        // The destination is our own server, serving a file.
        let copy = server.path("copy.raw")
        _ = try server.run("truncate", ["-s", "\(Self.size)", copy])
        let socket = server.path("ours.sock")
        func serve() async throws -> Process {
            try? FileManager.default.removeItem(atPath: socket)
            return try await server.start(nbdTool, ["serve", copy, "--socket", socket], waitFor: socket)
        }
        let ours = try await serve()
        let destination = NBDURI(socket: socket).description
        let journal = server.path("copy.journal")
        let done = try await copyKilling(ours, from: source, to: destination, journal: journal)
        _ = try await serve()
        try expectResumeCopiesTheRest(server, from: source, to: destination, landingIn: copy, journal: journal, done: done, log: log)
    }

    /// A journal written by hand: the first half of `pattern:8M` onto `copy.raw` is done, read
    /// from the source in the state it names (`pattern` and `zero` never change; nil: none).
    func handJournal(
        _ server: ServerProcess,
        source: String = "pattern:8M",
        done: [[Int]] = [[0, 4 << 20]],
        zeroed: Bool = true,
        identity: String? = "pattern"
    ) throws -> String {
        let journal = server.path("hand.journal")
        let copy = URL(fileURLWithPath: server.path("copy.raw")).resolvingSymlinksInPath().path
        var subject: [String: Any] = ["source": source, "sourceSize": 8 << 20, "destination": copy, "destinationSize": 8 << 20]
        subject["sourceIdentity"] = identity
        let record: [String: Any] = [
            "format": "nbd copy journal", "version": 1, "destinationStartedZeroed": zeroed, "done": done, "subject": subject,
        ]
        try JSONSerialization.data(withJSONObject: record).write(to: URL(fileURLWithPath: journal))
        return journal
    }

    @Test func aJournalOnlyResumesItsOwnCopy() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let copy = server.path("copy.raw")
        _ = try server.run("truncate", ["-s", "8M", copy])
        let journal = try handJournal(server)
        func refused(_ arguments: [String], saying words: String) throws {
            let result = try runNBD(arguments)
            #expect(result.status == 1, "\(arguments): \(result.error)")
            #expect(result.error.hasPrefix("nbd: ") && result.error.contains(words), "\(result.error)")
            #expect(result.error.split(separator: "\n").count == 1, "\(result.error)")
        }
        let other = server.path("other.raw")
        try refused(["copy", "--resume", journal, "pattern:8M", other], saying: "is for a copy onto \(copy), not onto \(other)")
        #expect(!FileManager.default.fileExists(atPath: other), "a refused copy creates nothing")
        try refused(
            ["copy", "--resume", journal, "pattern:16M", copy],
            saying: "is for a copy of pattern:8M (8388608 bytes), not of pattern:16M (16777216 bytes)"
        )
        #expect(try FileManager.default.attributesOfItem(atPath: copy)[.size] as? Int == 8 << 20, "a refused copy extends nothing")
        try refused(["copy", "--resume", journal, "zero:8M", copy], saying: "not of zero:8M")
        try refused(["copy", "--resume", journal, "pattern:8M", "-"], saying: "--resume needs a destination that keeps")
        // A journal that does not show the state its bytes were read in (an older nbd's, or a
        // copy from an export started without --source-state) cannot be resumed.
        _ = try handJournal(server, identity: nil)
        try refused(["copy", "--resume", journal, "pattern:8M", copy], saying: "cannot tell whether pattern:8M is still in the state")
        _ = try handJournal(server)

        // Its own copy goes on from the journal: the first half is skipped (and stays zero).
        let result = try runNBD(["copy", "--resume", journal, "--progress=json", "pattern:8M", copy])
        #expect(result.status == 0, "\(result.error)")
        // The progress counts the skipped half as done, but not in the rate (nor the ETA).
        let last = try #require(result.error.split(separator: "\n").last { $0.hasPrefix("{") })
        let object = try #require(try JSONSerialization.jsonObject(with: Data(last.utf8)) as? [String: Any])
        let (done, rate, elapsed) = (object["done"] as? Int, object["rate"] as? Double, object["elapsed"] as? Double)
        #expect(done == 8 << 20)
        let copiedAtThatRate = (rate ?? 0) * (elapsed ?? 0)
        #expect(copiedAtThatRate > 0.9 * Double(4 << 20) && copiedAtThatRate < 1.1 * Double(4 << 20), "\(last)")
        #expect(!FileManager.default.fileExists(atPath: journal))
        let bytes = try Data(contentsOf: URL(fileURLWithPath: copy))
        // Compared outside #expect: a failing comparison of megabytes would be diffed for ages.
        let firstHalfIsZero = bytes.prefix(4 << 20).allSatisfy { $0 == 0 }
        #expect(firstHalfIsZero)
        _ = try runNBD(["copy", "pattern:8M", server.path("expected.raw")])
        let expected = try Data(contentsOf: URL(fileURLWithPath: server.path("expected.raw")))
        let secondHalfIsCopied = bytes.count == 8 << 20 && bytes.suffix(4 << 20) == expected.suffix(4 << 20)
        #expect(secondHalfIsCopied)

        // What is not a journal, or not a sound one, is refused and left alone.
        try Data("{\"half\": ".utf8).write(to: URL(fileURLWithPath: journal))
        try refused(["copy", "--resume", journal, "pattern:8M", copy], saying: "is not a journal of nbd copy")
        #expect(try String(contentsOfFile: journal, encoding: .utf8) == "{\"half\": ")
        _ = try handJournal(server, done: [[4 << 20, 9 << 20]])
        try refused(["copy", "--resume", journal, "pattern:8M", copy], saying: "out of order or past the end")
        _ = try handJournal(server, done: [[2 << 20, 4 << 20], [0, 1 << 20]])
        try refused(["copy", "--resume", journal, "pattern:8M", copy], saying: "out of order or past the end")
        _ = try handJournal(server)
        try FileManager.default.removeItem(atPath: copy)
        try refused(["copy", "--resume", journal, "pattern:8M", copy], saying: "which is not there")
    }

    /// The first run's knowledge that the destination read as zeroes is kept: a resumed sparse
    /// copy onto a file the first run created leaves it alone; onto one that had data, the zero
    /// areas are zeroed, as punched holes (not written as zero bytes).
    @Test func aResumedCopyKeepsWhatTheFirstRunKnewOfItsDestination() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let copy = server.path("copy.raw")
        for zeroed in [true, false] {
            // Data everywhere: what the run zeroes shows, and so does what it leaves.
            try Data(repeating: 0xAB, count: 8 << 20).write(to: URL(fileURLWithPath: copy))
            let journal = try handJournal(server, source: "zero:8M", done: [[0, 1 << 20]], zeroed: zeroed, identity: "zero")
            let result = try runNBD(["copy", "--resume", journal, "zero:8M", copy])
            #expect(result.status == 0, "\(result.error)")
            let bytes = try Data(contentsOf: URL(fileURLWithPath: copy))
            #expect(bytes.prefix(1 << 20).allSatisfy { $0 == 0xAB }, "what the first run did is left")
            if zeroed {
                // The first run found it zeroed: nothing after the first MiB is touched.
                #expect(bytes.suffix(7 << 20).allSatisfy { $0 == 0xAB })
            } else {
                #expect(bytes.suffix(7 << 20).allSatisfy { $0 == 0 })
                #expect(allocatedBytes(copy) <= (1 << 20) + (64 << 10), "zeroes punched, not written")
            }
            try FileManager.default.removeItem(atPath: copy)
        }
    }
}
