/// `cycle` repeated up to `count` bytes, by doubling whole copies: test data made a byte at a
/// time takes seconds per megabyte in a debug build, and more under TSan.
public func repeatedCycle(_ cycle: [UInt8], count: Int) -> [UInt8] {
    var bytes = Array(cycle.prefix(count))
    guard !bytes.isEmpty else { return [] }
    bytes.reserveCapacity(2 * count)
    while bytes.count < count { bytes += bytes }
    return Array(bytes.prefix(count))
}
