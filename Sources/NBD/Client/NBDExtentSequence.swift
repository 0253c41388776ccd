import NBDCore

extension NBDExport {
    /// Whether `context` (for example `NBDMetaContext.baseAllocation`) was negotiated, so that
    /// ``extents(of:in:)`` and ``blockStatus(at:length:flags:)`` can report it.
    public func hasMetaContext(_ context: String) -> Bool {
        metaContexts.contains { $0.name == context }
    }

    /// The extents of one metadata context over `range` (default: the whole export), in order.
    ///
    /// Asks block status from where the last answer ended, as often as it takes: servers may
    /// answer for less than was asked. The extents are clipped to `range`; neighbours with the
    /// same status are not merged.
    ///
    /// ```swift
    /// for try await extent in export.extents(of: NBDMetaContext.baseAllocation) {
    ///     print(extent)   // 0..<65536: data
    /// }
    /// ```
    ///
    /// Iterating fails with `NBDError.Code.notAdvertised` when `context` was not negotiated,
    /// and with a protocol violation when an answer has no extent for it.
    public func extents(of context: String = NBDMetaContext.baseAllocation, in range: Range<UInt64>? = nil) -> NBDExtentSequence {
        NBDExtentSequence(export: self, context: context, range: range ?? 0..<size)
    }
}

/// The extents of one metadata context over a range of an export: see ``NBDExport/extents(of:in:)``.
public struct NBDExtentSequence: AsyncSequence, Sendable {
    public typealias Element = NBDExtent

    let export: NBDExport
    let context: String
    let range: Range<UInt64>

    public func makeAsyncIterator() -> AsyncIterator {
        AsyncIterator(export: export, context: context, range: range)
    }

    /// Fetches one block status answer at a time and hands out its extents.
    public struct AsyncIterator: AsyncIteratorProtocol {
        let export: NBDExport
        let context: String
        let end: UInt64
        /// Where the next answer must start: the end of the last extent received.
        var position: UInt64
        var pending: ArraySlice<NBDExtent> = []

        init(export: NBDExport, context: String, range: Range<UInt64>) {
            self.export = export
            self.context = context
            self.end = Swift.min(range.upperBound, export.size)
            self.position = Swift.min(range.lowerBound, end)
        }

        public mutating func next() async throws -> NBDExtent? {
            if pending.isEmpty {
                guard position < end else { return nil }
                guard export.hasMetaContext(context) else {
                    throw NBDError.unsupported("the metadata context \(context) was not negotiated with the server")
                }
                let extents = try await export.blockStatus(at: position, length: end - position)[context] ?? []
                // "the server MUST return at least one status descriptor": without one there is no progress.
                guard let last = extents.last else {
                    throw NBDError.serverViolation("block status at offset \(position) has no extent for \(context)")
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
