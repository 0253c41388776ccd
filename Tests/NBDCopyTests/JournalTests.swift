import Foundation
import NBDCopy
import Testing

/// The journal of a resumable copy: written whole, read back the same, and every file that is
/// not a sound journal of ours refused with a message naming why.
@Suite("CopyJournal")
struct JournalTests {
    let folder = FileManager.default.temporaryDirectory.appendingPathComponent("journal-\(UUID().uuidString)")
    var path: String { folder.appendingPathComponent("copy.journal").path }
    let subject = CopyJournal.Subject(
        source: "/a.raw",
        sourceSize: 1 << 20,
        destination: "/b.raw",
        destinationSize: 1 << 20,
        bitmap: nil,
        sourceIdentity: "file 1:2"
    )

    init() throws { try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true) }

    @Test func roundTrip() async throws {
        defer { try? FileManager.default.removeItem(at: folder) }
        #expect(try CopyJournal.load(path) == nil, "no journal yet")
        let journal = try CopyJournal.startOrResume(path, record: nil, subject: subject, destinationStartsZeroed: true)
        journal.completed(0..<4096)
        journal.completed(8192..<16384)
        journal.completed(4096..<8192)
        let destination = MemoryDestination(size: 1 << 20)
        try await journal.checkpoint(flushing: destination)
        #expect(destination.flushes == 1, "recorded only after a flush")
        let record = try #require(try CopyJournal.load(path))
        #expect(record.subject == subject && record.destinationStartedZeroed)
        #expect(record.done == [[0, 16384]])
        let resumed = try CopyJournal.startOrResume(path, record: record, subject: subject, destinationStartsZeroed: false)
        #expect(resumed.resumed.ranges == [0..<16384] && resumed.destinationStartedZeroed)
        // Another copy's journal is refused.
        var other = subject
        other.destination = "/c.raw"
        #expect { try CopyJournal.startOrResume(path, record: record, subject: other, destinationStartsZeroed: false) } throws: {
            ($0 as? NBDCopyError)?.code == .journal
        }
        try journal.remove()
        #expect(try CopyJournal.load(path) == nil)
    }

    @Test func whatIsNotASoundJournalIsRefused() throws {
        defer { try? FileManager.default.removeItem(at: folder) }
        let sound =
            #"{"destinationStartedZeroed":false,"done":[[0,4096]],"format":"nbd copy journal","#
            + #""subject":{"destination":"/b.raw","destinationSize":1048576,"source":"/a.raw","sourceSize":1048576},"version":1}"#
        #expect(throws: Never.self) { try write(sound) }
        #expect(try CopyJournal.load(path)?.done == [[0, 4096]])
        let cases: [(String, String)] = [
            (String(sound.prefix(40)), "is not a journal of nbd copy"),
            (#"{"some": "other json"}"#, "is not a journal of nbd copy"),
            (sound.replacingOccurrences(of: "nbd copy journal", with: "a diary"), "is not a journal of nbd copy"),
            (sound.replacingOccurrences(of: #""version":1"#, with: #""version":2"#), "of version 2"),
            (sound.replacingOccurrences(of: "[[0,4096]]", with: "[[4096,8192],[0,4096]]"), "out of order or past the end"),
            (sound.replacingOccurrences(of: "[[0,4096]]", with: "[[0,2000000]]"), "out of order or past the end"),
            (sound.replacingOccurrences(of: "[[0,4096]]", with: "[[5,5]]"), "out of order or past the end"),
            (String(repeating: " ", count: (16 << 20) + 1), "larger than 16 MiB"),
        ]
        for (contents, reason) in cases {
            try write(contents)
            #expect {
                try CopyJournal.load(path)
            } throws: { error in
                guard let error = error as? NBDCopyError else { return false }
                return error.code == .journal && error.message.contains(reason)
            }
        }
    }

    @Test func aLockHeldIsRefused() throws {
        defer { try? FileManager.default.removeItem(at: folder) }
        let lock = try CopyJournalLock(journal: path)
        #expect { try CopyJournalLock(journal: path) } throws: { ($0 as? NBDCopyError)?.message.contains("another nbd copy") == true }
        lock.release()
        try CopyJournalLock(journal: path).release()
    }

    func write(_ text: String) throws {
        try Data(text.utf8).write(to: URL(fileURLWithPath: path))
    }
}
