import NBDSystem
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Holds `FILE.lock`, locked, while a copy uses the journal FILE: the same copy started again
/// while it runs (an overlapping cron job) is refused rather than let loose on the same
/// journal and destination. The kernel lets go of a killed run's lock.
///
/// ``copy(from:to:options:progress:stop:)`` takes it by itself. A program that must refuse a
/// second run before it opens anything (as `nbd copy --resume` does) takes it first, with
/// ``CopyOptions/Journal/lock()``; the copy then finds it held by this process and goes on.
public final class CopyJournalLock: Sendable {
    /// The journal's path, as given.
    public let journal: String
    private let descriptor: Int32

    /// Journals whose lock this process holds: a copy does not try to take them again (flock
    /// would refuse the same process through another descriptor).
    private static let held = NIOLockedValueBox<Set<String>>([])

    /// Takes the lock of the journal at `journal`; throws ``NBDCopyError/Code/journal`` when
    /// another process (or another lock of this one) holds it.
    public init(journal: String) throws {
        self.journal = journal
        let path = journal + ".lock"
        descriptor = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard descriptor >= 0 else { throw NBDCopyError(.journal, "cannot create \(path): \(String(cString: strerror(errno)))") }
        guard flock(descriptor, LOCK_EX | LOCK_NB) == 0 else {
            _ = CLibrary.close(descriptor)
            throw NBDCopyError(.journal, "another nbd copy is using the journal \(journal) (it holds \(path))")
        }
        Self.held.withLockedValue { _ = $0.insert(journal) }
    }

    /// Lets go; the lock file goes too when no journal is left (the copy is complete, or
    /// never began).
    public func release() {
        Self.held.withLockedValue { _ = $0.remove(journal) }
        if access(journal, F_OK) != 0 { unlink(journal + ".lock") }
        _ = CLibrary.close(descriptor)
    }

    /// The lock of `journal` for a copy: nil when this process holds it already (its holder
    /// releases it), a new one otherwise.
    static func forCopy(_ journal: String) throws -> CopyJournalLock? {
        try held.withLockedValue { $0.contains(journal) } ? nil : CopyJournalLock(journal: journal)
    }
}
