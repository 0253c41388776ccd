@_spi(NBDMachines) import NBDCore

extension NBDExport {
    /// Whether `context` (for example `NBDMetaContext.baseAllocation`) was negotiated, so that
    /// ``extents(of:in:)`` and ``blockStatus(at:length:flags:)`` can report it.
    public func hasMetaContext(_ context: NBDMetaContext) -> Bool {
        metaContexts.contains(context)
    }

    /// The extents of one metadata context over `range` (default: the whole export), in order.
    ///
    /// Asks block status from where the last answer ended, as often as it takes: servers may
    /// answer for less than was asked. The extents are clipped to `range`; neighbours with the
    /// same status are not merged.
    ///
    /// ```swift
    /// for try await extent in export.extents(of: .baseAllocation) {
    ///     print(extent)   // 0..<65536: data
    /// }
    /// ```
    ///
    /// Iterating fails with `NBDError.Code.notAdvertised` when `context` was not negotiated,
    /// and with a protocol violation when an answer has no extent for it.
    public func extents(of context: NBDMetaContext = .baseAllocation, in range: Range<UInt64>? = nil) -> NBDExtentSequence {
        NBDExtentSequence(source: self, context: context, range: range)
    }
}

/// What the extent walker asks block status of: an export, or a client's connections.
protocol BlockStatusSource: Sendable {
    /// The export's size, and whether `context` was negotiated.
    func scope(of context: NBDMetaContext) async throws -> (size: UInt64, negotiated: Bool)
    func blockStatus(at offset: UInt64, length: UInt64, flags: CommandFlags) async throws -> NBDBlockStatus
}

extension NBDExport: BlockStatusSource {
    func scope(of context: NBDMetaContext) async throws -> (size: UInt64, negotiated: Bool) { (size, hasMetaContext(context)) }
}

/// The extents of one metadata context over a range of an export: see ``NBDExport/extents(of:in:)``
/// and ``NBDClient/extents(of:in:)``.
public struct NBDExtentSequence: AsyncSequence, Sendable {
    public typealias Element = NBDExtent

    let source: any BlockStatusSource
    let context: NBDMetaContext
    /// Nil: the whole export.
    let range: Range<UInt64>?

    public func makeAsyncIterator() -> AsyncIterator {
        AsyncIterator(source: source, context: context, range: range)
    }

    /// Fetches one block status answer at a time and hands out its extents.
    public struct AsyncIterator: AsyncIteratorProtocol {
        let source: any BlockStatusSource
        let context: NBDMetaContext
        let range: Range<UInt64>?
        /// Where the walk ends, once the export's size is known.
        var end: UInt64?
        /// Where the next answer must start: the end of the last extent received.
        var position: UInt64 = 0
        var pending: ArraySlice<NBDExtent> = []

        init(source: any BlockStatusSource, context: NBDMetaContext, range: Range<UInt64>?) {
            self.source = source
            self.context = context
            self.range = range
        }

        public mutating func next() async throws -> NBDExtent? {
            if end == nil {
                let (size, negotiated) = try await source.scope(of: context)
                guard negotiated else {
                    throw NBDError.unsupported("the metadata context \(context.name) was not negotiated with the server")
                }
                end = Swift.min(range?.upperBound ?? size, size)
                position = Swift.min(range?.lowerBound ?? 0, end!)
            }
            let end = self.end!
            if pending.isEmpty {
                guard position < end else { return nil }
                let extents = try await source.blockStatus(at: position, length: end - position, flags: [])[context] ?? []
                // "the server MUST return at least one status descriptor": without one there is no progress.
                guard let last = extents.last else {
                    throw NBDError.serverViolation("block status at offset \(position) has no extent for \(context.name)")
                }
                pending = extents[...]
                position = last.offset + last.length
            }
            var extent = pending.removeFirst()
            // The last extent may run past what was asked, and past the end of the export.
            let extentEnd = Swift.min(extent.offset + extent.length, end)
            extent.length = extentEnd - extent.offset
            if extentEnd >= end { pending = [] }
            return extent
        }
    }
}

extension NBDExtentSequence {
    /// The same extents with neighbours of equal status merged: one extent per run of data,
    /// of holes, of dirty blocks, as nbdinfo --map prints them.
    public func mergingNeighbours() -> NBDMergedExtentSequence { NBDMergedExtentSequence(base: self) }
}

/// The extents of an ``NBDExtentSequence`` with neighbours of equal status merged: see
/// ``NBDExtentSequence/mergingNeighbours()``.
public struct NBDMergedExtentSequence: AsyncSequence, Sendable {
    public typealias Element = NBDExtent

    let base: NBDExtentSequence

    public func makeAsyncIterator() -> AsyncIterator { AsyncIterator(base: base.makeAsyncIterator()) }

    /// Reads one extent ahead, to know where a run ends.
    public struct AsyncIterator: AsyncIteratorProtocol {
        var base: NBDExtentSequence.AsyncIterator
        var ahead: NBDExtent?

        public mutating func next() async throws -> NBDExtent? {
            var first = ahead
            ahead = nil
            if first == nil { first = try await base.next() }
            guard var run = first else { return nil }
            while let extent = try await base.next() {
                guard extent.flags == run.flags, extent.offset == run.range.upperBound else {
                    ahead = extent
                    break
                }
                run.length += extent.length
            }
            return run
        }
    }
}
