/// The blkhash of `source`, as `nbdcopy --blkhash SOURCE null:` and `nbd checksum` print it:
/// zero areas of the source are not read, and a block of zeroes costs one comparison.
///
/// - Parameters:
///   - source: what to hash; left open.
///   - specification: the algorithm and block size.
///   - options: the request size, requests in flight and memory of the reads.
///   - progress: counts the bytes as they are hashed; made for the source's size when nil.
///   - stop: ends the reading after what is in flight; the result is then nil.
/// - Returns: the blkhash, or nil when `stop` ended the reading before its end.
public func checksum(
    of source: any CopySource,
    specification: BlockHashSpecification = .default,
    options: CopyOptions = CopyOptions(),
    progress: CopyProgress? = nil,
    stop: CopyStop = CopyStop()
) async throws -> BlockHash? {
    try options.validate()
    guard !source.hasCleanRanges else {
        throw NBDCopyError(.invalidArgument, "a checksum reads everything: open the source without a dirty bitmap")
    }
    let progress = progress ?? CopyProgress(total: source.size)
    defer { progress.finish() }
    return try await BlockHasher.reading(source, as: specification, options: options, progress: progress, stop: stop)
}
