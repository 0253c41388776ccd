/// Copies `source` onto `destination`, as `nbd copy` does: sparse (zero areas of the source are
/// not read, blocks of zeroes are zeroed rather than written), with the requests of several
/// workers in flight, in bounded memory.
///
/// With ``CopyOptions/journal``, the copy is resumable: what was written is flushed and
/// recorded every second, and the same copy run again copies only the rest. With a source
/// opened on a dirty bitmap (``NBDEndpoint/open(_:connections:requests:destinationIsZero:bitmap:allocates:configuration:onEvent:)``),
/// only what the bitmap marks dirty is copied, onto a full copy of the source's size.
///
/// The endpoints are not closed: they are the caller's.
///
/// - Parameters:
///   - source: where to read.
///   - destination: where to write.
///   - options: sizes, counts, flush, blkhash and journal; the tool's defaults otherwise.
///   - progress: counts the bytes as they are done; made for the source's size when nil.
///     Finished when the copy ends.
///   - stop: asks the copy to end after what is in flight (the report then says
///     ``CopyReport/stopped``). Cancelling the task instead ends it at once; a resumable
///     copy still records what was written, giving the destination's flush at most 2 s.
/// - Throws: ``NBDCopyError`` (or the endpoints' own errors, such as `NBDError`). A resumable
///   copy's journal records what was written before the failure.
public func copy(
    from source: any CopySource,
    to destination: any CopyDestination,
    options: CopyOptions = CopyOptions(),
    progress: CopyProgress? = nil,
    stop: CopyStop = CopyStop()
) async throws -> CopyReport {
    // Refusals first: a journal is not even locked for a copy that cannot work.
    try options.validate()
    try requireFit(source, destination, options)
    // Held already when the caller took it before opening anything (CopyOptions.Journal.lock()).
    let lock = try options.journal.flatMap { try CopyJournalLock.forCopy($0.path) }
    defer { lock?.release() }
    return try await copyHoldingJournalLock(from: source, to: destination, options: options, progress: progress, stop: stop)
}

/// ``copy(from:to:options:progress:stop:)`` once the journal's lock is held.
private func copyHoldingJournalLock(
    from source: any CopySource,
    to destination: any CopyDestination,
    options: CopyOptions,
    progress: CopyProgress?,
    stop: CopyStop
) async throws -> CopyReport {
    let progress = progress ?? CopyProgress(total: source.size)
    var finished = false
    defer { if !finished { progress.finish() } }
    // Only now is the destination changed, if it needs to be (a short file extended).
    try await destination.prepare()
    let journal = try options.journal.map { try CopyJournal.forCopy($0, source: source, destination: destination) }
    let resumedBytes = journal?.resumed.byteCount ?? 0
    // What an earlier run copied is not read again: the blkhash of a resumed copy is made by
    // reading the source once more, after the copy.
    let hasher = resumedBytes > 0 ? nil : options.blockHash.map(BlockHasher.init)
    let copier = Copier(
        source: source,
        destination: destination,
        requestSize: options.requestSize,
        requests: options.requests,
        memory: options.memory,
        sparse: options.sparseBlockSize,
        progress: progress,
        hasher: hasher,
        journal: journal
    )
    var failure: (any Error)?
    var copied: UInt64 = 0
    do {
        copied = try await progress.watchingReconnections(of: source, destination) {
            if let journal {
                try await journal.checkpointing(flushing: destination) { try await copier.run(stop: stop) }
            } else {
                try await copier.run(stop: stop)
            }
        }
        if (options.flush || journal != nil) && !stop.isRequested { try await destination.flush() }
    } catch {
        failure = error
    }
    finished = true
    progress.finish()
    if let journal {
        if failure == nil && !stop.isRequested {
            // Complete: nothing is left to resume. A journal that cannot be removed says all
            // is done, which is true.
            try? journal.remove()
        } else {
            // What was written is flushed and recorded; should that fail, the journal holds
            // less, and the next run copies more.
            await journal.lastCheckpoint(flushing: destination)
        }
    }
    if let failure { throw failure }
    var blockHash: BlockHash?
    if let specification = options.blockHash, !stop.isRequested {
        if let hasher {
            blockHash = try hasher.finish(size: copied)
        } else {
            blockHash = try await BlockHasher.reading(source, as: specification, options: options, stop: stop)
        }
    }
    return CopyReport(
        bytes: copied,
        skippedBytes: progress.snapshot.skipped,
        resumedBytes: resumedBytes,
        blockHash: blockHash,
        stopped: stop.isRequested
    )
}

/// Refuses, before anything is read or written, what cannot work together.
private func requireFit(_ source: any CopySource, _ destination: any CopyDestination, _ options: CopyOptions) throws {
    if source.hasCleanRanges {
        guard let needed = source.size else { throw NBDCopyError(.invalidArgument, "an incremental copy needs a source with a size") }
        guard !destination.discards, !destination.isSequential, let available = destination.size ?? destination.currentSize,
            available == needed
        else {
            let actual = (destination.size ?? destination.currentSize).map { "not \($0)" } ?? "not a stream"
            throw NBDCopyError(.sizeMismatch, "an incremental copy needs a destination of the source's size (\(needed) bytes), \(actual)")
        }
        if destination.isNew {
            throw NBDCopyError(
                .invalidArgument,
                "an incremental copy goes onto an existing copy, and the destination was created or extended"
            )
        }
        // What the bitmap calls clean is not read, so there is no whole image to hash.
        guard options.blockHash == nil else {
            throw NBDCopyError(.invalidArgument, "an incremental copy reads only what changed: a blkhash needs it all")
        }
    }
    if let needed = source.size, let available = destination.size, available < needed {
        throw NBDCopyError(.sizeMismatch, "the destination (\(available) bytes) is smaller than the source (\(needed) bytes)")
    }
    if options.journal != nil {
        guard source.size != nil else {
            throw NBDCopyError(.invalidArgument, "a resumable copy needs a source that can be read again, not a stream")
        }
        guard !destination.discards, !destination.isSequential else {
            throw NBDCopyError(.invalidArgument, "a resumable copy needs a destination that keeps what was written, not a stream")
        }
    }
}
