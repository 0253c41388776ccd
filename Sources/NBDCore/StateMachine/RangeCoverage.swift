/// The byte ranges of a reply covered so far, kept merged and sorted, so that overlapping
/// chunks are caught ("MUST NOT send content chunks that overlap") and exact coverage checked.
@usableFromInline
struct RangeCoverage: Sendable {
    /// What is covered while it is one range (as the chunks of nearly every reply make it),
    /// kept without an array, whose allocation would cost every request.
    @usableFromInline var single: Range<UInt64>?
    /// What is covered, once it is more than one range; empty before.
    @usableFromInline var ranges: [Range<UInt64>] = []
    /// Total bytes covered.
    @usableFromInline var total: UInt64 = 0

    @inlinable init() {}

    /// Adds `range`; false (and nothing added) when it overlaps what is covered.
    @inlinable mutating func insert(_ range: Range<UInt64>) -> Bool {
        if ranges.isEmpty {
            guard let covered = single else {
                single = range
                total += UInt64(range.count)
                return true
            }
            if covered.overlaps(range) { return false }
            if covered.upperBound == range.lowerBound || range.upperBound == covered.lowerBound {
                single = min(covered.lowerBound, range.lowerBound)..<max(covered.upperBound, range.upperBound)
                total += UInt64(range.count)
                return true
            }
            ranges = [covered]
            single = nil
        }
        // First stored range that ends after the new one starts.
        var low = 0
        var high = ranges.count
        while low < high {
            let mid = (low + high) / 2
            if ranges[mid].upperBound <= range.lowerBound { low = mid + 1 } else { high = mid }
        }
        if low < ranges.count, ranges[low].lowerBound < range.upperBound { return false }
        var merged = range
        var removeFrom = low
        var removeTo = low
        if low > 0, ranges[low - 1].upperBound == range.lowerBound {
            merged = ranges[low - 1].lowerBound..<merged.upperBound
            removeFrom = low - 1
        }
        if low < ranges.count, ranges[low].lowerBound == range.upperBound {
            merged = merged.lowerBound..<ranges[low].upperBound
            removeTo = low + 1
        }
        ranges.replaceSubrange(removeFrom..<removeTo, with: [merged])
        total += UInt64(range.count)
        return true
    }
}

extension Range<UInt64> {
    /// Whether the `length` bytes at `offset` share a byte with the range, with no overflow
    /// whatever the values.
    @inlinable func overlaps(_ offset: UInt64, length: UInt64) -> Bool {
        !isEmpty && length > 0 && offset < upperBound && lowerBound - Swift.min(lowerBound, offset) < length
    }
}
