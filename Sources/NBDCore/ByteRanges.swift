/// Byte ranges kept in order, merged where they touch: what a resumable copy has done, what a
/// client has written since its last flush.
package struct ByteRanges: Sendable, Equatable {
    package private(set) var ranges: [Range<UInt64>] = []

    package init() {}

    /// `ranges` as they are, when they are in order, non-empty and apart; nil otherwise.
    package init?(ordered ranges: [Range<UInt64>]) {
        for (previous, next) in zip(ranges, ranges.dropFirst()) where previous.upperBound >= next.lowerBound { return nil }
        guard !ranges.contains(where: \.isEmpty) else { return nil }
        self.ranges = ranges
    }

    package var byteCount: UInt64 { ranges.reduce(0) { $0 + UInt64($1.count) } }

    /// Adds `range`, merging it with those it touches.
    package mutating func insert(_ range: Range<UInt64>) {
        guard !range.isEmpty else { return }
        // Everything before the first range that reaches `range` stays.
        let first = firstIndex(reaching: range.lowerBound)
        var last = first
        var merged = range
        while last < ranges.count, ranges[last].lowerBound <= range.upperBound {
            merged = min(merged.lowerBound, ranges[last].lowerBound)..<max(merged.upperBound, ranges[last].upperBound)
            last += 1
        }
        ranges.replaceSubrange(first..<last, with: [merged])
    }

    package mutating func formUnion(_ other: ByteRanges) {
        for range in other.ranges { insert(range) }
    }

    /// The ranges cut to `window`.
    package func clamped(to window: Range<UInt64>) -> [Range<UInt64>] {
        var cut: [Range<UInt64>] = []
        var index = firstIndex(reaching: window.lowerBound)
        while index < ranges.count, ranges[index].lowerBound < window.upperBound {
            let part = ranges[index].clamped(to: window)
            if !part.isEmpty { cut.append(part) }
            index += 1
        }
        return cut
    }

    /// The first range that ends at or after `offset`, by binary search (a journal read from a
    /// file may hold many ranges).
    private func firstIndex(reaching offset: UInt64) -> Int {
        var low = 0
        var high = ranges.count
        while low < high {
            let middle = (low + high) / 2
            if ranges[middle].upperBound < offset { low = middle + 1 } else { high = middle }
        }
        return low
    }
}
