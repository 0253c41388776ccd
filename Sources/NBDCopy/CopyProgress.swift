import NIOConcurrencyHelpers

/// How far a copy or checksum is, as values: the workers count bytes in, whoever shows the
/// progress reads ``snapshot`` or iterates ``updates``. It never prints anything itself.
public final class CopyProgress: Sendable {
    /// The progress at one moment.
    public struct Snapshot: Sendable, Equatable {
        /// Bytes done, copied or skipped.
        public var done: UInt64
        /// Of ``done``, what needed no copying (clean in a dirty bitmap, or copied by an
        /// earlier run of a resumed copy): not part of the rate.
        public var skipped: UInt64
        /// The size of the source, when it has one (not a stream).
        public var total: UInt64?
        /// Time since the progress was made.
        public var elapsed: Duration
        /// True in the last snapshot, when the work has ended (done, failed or stopped).
        public var finished: Bool
        /// True while the copy waits for a lost connection of an export to be made again
        /// (within its client's reconnect delay): nothing moves meanwhile, and the rate falls.
        public var reconnecting = false

        /// ``elapsed`` in seconds (at least a millisecond, so that rates stay finite).
        public var seconds: Double {
            max(Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18, 0.001)
        }

        /// Bytes copied per second: what was skipped does not count.
        public var rate: Double { Double(done - skipped) / seconds }

        /// Seconds left at ``rate``, when the total is known and bytes are moving.
        public var secondsLeft: Double? {
            guard let total, rate > 0 else { return nil }
            return Double(total - min(done, total)) / rate
        }

        /// Whole percent done, when the total is known (100 for an empty source).
        public var percent: Int? { total.map { $0 == 0 ? 100 : Int(done * 100 / $0) } }
    }

    private struct Counts {
        var done: UInt64 = 0
        var skipped: UInt64 = 0
        var finished = false
        var lastUpdate: ContinuousClock.Instant?
        /// What says whether an endpoint is reconnecting, while a copy runs.
        var reconnecting: (@Sendable () -> Bool)?
        /// ``Snapshot/reconnecting`` in the last update.
        var reportedReconnecting = false
    }

    /// How often a running copy looks whether an endpoint is reconnecting: a stalled copy
    /// moves no bytes, so no update would say it otherwise.
    static let reconnectionCheckInterval: Duration = .milliseconds(250)

    /// Snapshots go to ``updates`` at most this often (the last one always): a copy does
    /// thousands of pieces a second, and waking a reader for each would cost more than the
    /// pieces' own bookkeeping.
    public static let updateInterval: Duration = .milliseconds(50)

    private let total: UInt64?
    private let start = ContinuousClock.now
    private let counts = NIOLockedValueBox(Counts())
    private let continuation: AsyncStream<Snapshot>.Continuation
    /// Snapshots as the work moves, at most one per ``updateInterval``, the newest one kept for
    /// a slow reader; ends after the finished one. One reader at a time.
    public let updates: AsyncStream<Snapshot>

    /// Progress towards `total` bytes (nil: unknown, a stream).
    public init(total: UInt64?) {
        self.total = total
        (updates, continuation) = AsyncStream.makeStream(of: Snapshot.self, bufferingPolicy: .bufferingNewest(1))
    }

    /// Where the work is now.
    public var snapshot: Snapshot {
        let counts = counts.withLockedValue { $0 }
        return Snapshot(
            done: counts.done,
            skipped: counts.skipped,
            total: total,
            elapsed: .now - start,
            finished: counts.finished,
            reconnecting: !counts.finished && (counts.reconnecting?() ?? false)
        )
    }

    /// Runs `work` with ``Snapshot/reconnecting`` telling whether `source` or `destination`
    /// is reconnecting; an update goes out whenever that changes.
    package func watchingReconnections<T: Sendable>(
        of source: any CopySource,
        _ destination: any CopyDestination,
        _ work: @escaping @Sendable () async throws -> T
    ) async throws -> T {
        guard source.isReconnecting != nil || destination.isReconnecting != nil else { return try await work() }
        counts.withLockedValue { $0.reconnecting = { source.isReconnecting == true || destination.isReconnecting == true } }
        defer { counts.withLockedValue { $0.reconnecting = nil } }
        return try await withThrowingTaskGroup(of: T?.self) { group in
            group.addTask { try await work() }
            group.addTask {
                while true {
                    try await Task.sleep(for: Self.reconnectionCheckInterval)
                    self.updateIfReconnectingChanged()
                }
            }
            defer { group.cancelAll() }
            // The work ends first; the watch is then cancelled.
            while let result = try await group.next() {
                if let result { return result }
            }
            throw CancellationError()
        }
    }

    private func updateIfReconnectingChanged() {
        let now = snapshot
        let changed = counts.withLockedValue { counts in
            defer { counts.reportedReconnecting = now.reconnecting }
            return counts.reportedReconnecting != now.reconnecting
        }
        if changed { continuation.yield(now) }
    }

    /// Counts `bytes` more as done (and as skipped, with `skipped`).
    package func add(_ bytes: UInt64, skipped: Bool = false) {
        let now = ContinuousClock.now
        let due = counts.withLockedValue { counts in
            counts.done += bytes
            if skipped { counts.skipped += bytes }
            if let last = counts.lastUpdate, now - last < Self.updateInterval { return false }
            counts.lastUpdate = now
            return true
        }
        if due { continuation.yield(snapshot) }
    }

    /// The work has ended: the last snapshot says so, and ``updates`` ends.
    package func finish() {
        counts.withLockedValue { $0.finished = true }
        continuation.yield(snapshot)
        continuation.finish()
    }
}
