import NBDCore

/// What a journal recorded of its copy: read with ``CopyOptions/Journal/recorded()`` before
/// anything is opened, to tell the user what a resume will skip, or to refuse at once.
public struct RecordedCopy: Sendable, Equatable {
    /// The source's name, as the first run gave it.
    public let source: String
    /// The source's size in bytes.
    public let sourceSize: UInt64
    /// The destination's name.
    public let destination: String
    /// The destination's size when the journal was last written.
    public let destinationSize: UInt64
    /// The dirty bitmap of an incremental copy.
    public let bitmap: String?
    /// ``CopyOptions/Journal/sourceState`` of the first run.
    public let sourceState: String?
    /// True when the destination read as zeroes before the first run wrote to it.
    public let destinationStartedZeroed: Bool
    /// Bytes written and flushed: what a resumed copy skips.
    public let doneBytes: UInt64

    init(_ record: CopyJournal.Record, done: ByteRanges) {
        source = record.subject.source
        sourceSize = record.subject.sourceSize
        destination = record.subject.destination
        destinationSize = record.subject.destinationSize
        bitmap = record.subject.bitmap
        sourceState = record.subject.sourceState
        destinationStartedZeroed = record.destinationStartedZeroed
        doneBytes = done.byteCount
    }
}

extension CopyOptions.Journal {
    /// What an earlier run recorded at ``path``, or nil when there is no journal. Throws
    /// ``NBDCopyError/Code/journal`` for a file that is not one.
    public func recorded() throws -> RecordedCopy? {
        guard let record = try CopyJournal.load(path) else { return nil }
        return RecordedCopy(record, done: CopyJournal.done(of: record) ?? ByteRanges())
    }

    /// Locks the journal until the lock is released: taken before the endpoints are opened,
    /// so that a second run of the same copy touches nothing (``copy(from:to:options:progress:stop:)``
    /// finds it held and goes on).
    public func lock() throws -> CopyJournalLock {
        try CopyJournalLock(journal: path)
    }

    /// Throws ``NBDCopyError/Code/journal`` unless the journal at ``path`` (if any) can be
    /// resumed by a copy of `source`, before the destination is opened: the same source, of
    /// the same size, in the same state (see ``sourceState``). The copy checks it again, with
    /// the destination.
    public func requireResumable(from source: any CopySource) throws {
        guard let record = try CopyJournal.load(path) else { return }
        let recorded = record.subject
        guard recorded.source == self.source, recorded.sourceSize == source.size else {
            throw NBDCopyError(
                .journal,
                "the journal \(path) is for a copy of \(recorded.source) (\(recorded.sourceSize) bytes), not of \(self.source) "
                    + "(\(source.size.map { "\($0) bytes" } ?? "a stream")): remove it to start over"
            )
        }
        guard recorded.destination == destination else {
            throw NBDCopyError(
                .journal,
                "the journal \(path) is for a copy onto \(recorded.destination), not onto \(destination): remove it to start over"
            )
        }
        // An empty journal holds nothing to mix: it is begun again for the source as it is.
        guard !record.done.isEmpty else { return }
        var now = recorded
        (now.sourceState, now.sourceIdentity) = (sourceState, source.stateIdentity)
        try CopyJournal.requireSameState(of: recorded, as: now, journal: path)
    }
}
