import NBD

/// Reads `copy` back and checks that it has the blkhash `expected` (the source's: a copy's
/// ``CopyReport/blockHash``, or ``checksum(of:specification:options:progress:stop:)``'s).
///
/// Read `copy` over connections of its own, opened after the copy's destination was flushed:
/// the effects of a flush are all the protocol promises other connections.
///
/// - Parameters:
///   - copy: what to read back; left open.
///   - expected: the blkhash it must have, and how to compute it.
///   - source: when given, and the blkhashes differ, the first 16 MiB region that differs is
///     read from both, to name the first block that does.
///   - options: the request size, requests in flight and memory of the reads.
///   - stop: ends the reading after what is in flight; the result is then false.
/// - Returns: true when `copy` reads back with the blkhash `expected`; false when `stop`
///   ended the reading first.
/// - Throws: ``NBDCopyError/Code/verificationFailed``, saying where the copy differs.
public func verify(
    _ copy: any CopySource,
    matches expected: BlockHash,
    source: (any CopySource)? = nil,
    options: CopyOptions = CopyOptions(),
    stop: CopyStop = CopyStop()
) async throws -> Bool {
    try options.validate()
    if let size = copy.size, size < expected.size {
        throw NBDCopyError(.verificationFailed, "verify failed: the destination has \(size) bytes, and the source \(expected.size)")
    }
    guard
        let hash = try await BlockHasher.reading(
            copy,
            as: expected.specification,
            length: expected.size,
            options: options,
            stop: stop
        )
    else { return false }
    guard hash != expected else { return true }
    let region = hash.firstDifferentRegion(from: expected) ?? 0
    let difference = try await firstDifference(source, copy, region: region, of: expected)
    throw NBDCopyError(.verificationFailed, "verify failed: \(difference)")
}

/// Where in `region` the two first differ, in words: a block, or the region itself when the
/// source cannot be read again (a stream) or now reads as the copy does.
private func firstDifference(
    _ source: (any CopySource)?,
    _ copy: any CopySource,
    region: Int,
    of hash: BlockHash
) async throws -> String {
    let blockSize = UInt64(hash.specification.blockSize)
    let regionSize = max(blockSize, 16 << 20)
    let start = UInt64(region) * regionSize
    let end = min(hash.size, start + regionSize)
    let regionText = "the destination differs from the source in bytes \(start)..<\(end)"
    guard let source, source.size != nil else { return regionText }
    var offset = start
    while offset < end {
        let count = Int(min(blockSize, end - offset))
        let theirs = try await source.read(at: offset, length: count, worker: 0)
        let ours = try await copy.read(at: offset, length: count, worker: 0)
        if theirs != ours {
            let block = "block \(offset / blockSize) of \(ByteCount.exactText(blockSize)), bytes \(offset)..<\(offset + UInt64(count))"
            return "the destination differs from the source first in \(block)"
        }
        offset += UInt64(count)
    }
    return regionText
}
