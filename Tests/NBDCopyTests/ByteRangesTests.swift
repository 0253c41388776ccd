import NBDCopy
import NBDCore
import Testing

@Suite("ByteRanges")
struct ByteRangesTests {
    @Test func insertsMergeWhatTheyTouch() {
        var ranges = ByteRanges()
        ranges.insert(10..<20)
        ranges.insert(30..<40)
        ranges.insert(0..<5)
        #expect(ranges.ranges == [0..<5, 10..<20, 30..<40])
        // Touching at an end merges; so does bridging a gap.
        ranges.insert(20..<25)
        #expect(ranges.ranges == [0..<5, 10..<25, 30..<40])
        ranges.insert(4..<31)
        #expect(ranges.ranges == [0..<40])
        // Empty and contained ranges change nothing.
        ranges.insert(7..<7)
        ranges.insert(12..<13)
        #expect(ranges.ranges == [0..<40])
        #expect(ranges.byteCount == 40)
    }

    @Test func clampedCutsToTheWindow() throws {
        let ranges = try #require(ByteRanges(ordered: [0..<10, 20..<30, 40..<50]))
        #expect(ranges.clamped(to: 5..<45) == [5..<10, 20..<30, 40..<45])
        #expect(ranges.clamped(to: 10..<20).isEmpty)
        #expect(ranges.clamped(to: 60..<70).isEmpty)
    }

    @Test func orderedRefusesWhatIsNot() {
        #expect(ByteRanges(ordered: [0..<10, 10..<20]) == nil, "touching ranges are one range")
        #expect(ByteRanges(ordered: [20..<30, 0..<10]) == nil)
        #expect(ByteRanges(ordered: [0..<10, 5..<20]) == nil)
        #expect(ByteRanges(ordered: [3..<3]) == nil)
        #expect(ByteRanges(ordered: []) == ByteRanges())
    }

    @Test func unionOfMany() {
        var even = ByteRanges()
        var odd = ByteRanges()
        for index in stride(from: UInt64(0), to: 1000, by: 2) { even.insert(index * 10..<index * 10 + 10) }
        for index in stride(from: UInt64(1), to: 1000, by: 2) { odd.insert(index * 10..<index * 10 + 10) }
        #expect(even.ranges.count == 500)
        even.formUnion(odd)
        #expect(even.ranges == [0..<10000])
    }
}
