import Foundation
import NBD
import NBDCopy

/// `nbd copy --verify`: reads the destination back over new connections, hashes it as the source
/// was hashed during the copy, and when the two blkhashes differ, names the first block that
/// does (the region digests of both hashes narrow it to 16 MiB, which is then read from both).
struct Verifier {
    let copy: Copy
    let configuration: NBDClient.Configuration
    let interrupt: Interrupt

    func check(source: any CopySource, length: UInt64, against sourceHash: BlockHasher, digest: [UInt8]) async throws {
        var hashing = configuration
        // Hashed and dropped: taken as it arrived, in SwiftNIO's large reads.
        hashing.connection.readsDataDirectly = false
        let readBack = try await Endpoints.source(
            copy.destination,
            connections: copy.connections,
            requests: copy.requests,
            configuration: hashing
        )
        let difference: Result<String?, any Error>
        do {
            difference = .success(try await compare(source, readBack, length: length, against: sourceHash, digest: digest))
        } catch {
            difference = .failure(error)
        }
        await readBack.close()
        if let difference = try difference.get() {
            throw CommandError("verify failed: \(difference)")
        }
    }

    /// Where the destination first differs from the source, or nil when it does not (or the
    /// read back was interrupted).
    private func compare(
        _ source: any CopySource,
        _ readBack: any CopySource,
        length: UInt64,
        against sourceHash: BlockHasher,
        digest: [UInt8]
    ) async throws -> String? {
        let (hash, _) = try await BlockHasher.reading(
            readBack,
            as: sourceHash.specification,
            length: length,
            requestSize: copy.requestSize,
            requests: copy.requests,
            memory: copy.memory,
            stop: interrupt.stop
        )
        guard !interrupt.happened else { return nil }
        guard try hash.finish(size: length) != digest else {
            StandardStreams.error("nbd: verified: the destination reads back with the source's blkhash (\(hash.specification))\n")
            return nil
        }
        let region = hash.firstDifferentRegion(from: sourceHash) ?? 0
        return try await firstDifference(source, readBack, region: region, of: hash, length: length)
    }

    /// Where in `region` the two first differ, in words: a block, or the region itself when the
    /// source cannot be read again (a stream) or now reads as the destination does.
    private func firstDifference(
        _ source: any CopySource,
        _ readBack: any CopySource,
        region: UInt64,
        of hash: BlockHasher,
        length: UInt64
    ) async throws -> String {
        let blockSize = UInt64(hash.specification.blockSize)
        let start = region * hash.regionBlocks * blockSize
        let end = min(length, start + hash.regionBlocks * blockSize)
        let regionText = "the destination differs from the source in bytes \(start)..<\(end)"
        guard source.size != nil else { return regionText }
        var offset = start
        while offset < end {
            let count = Int(min(blockSize, end - offset))
            let theirs = CopyData([try await source.read(at: offset, length: count, worker: 0)])
            let ours = CopyData([try await readBack.read(at: offset, length: count, worker: 0)])
            if theirs.bytes != ours.bytes {
                let block =
                    "block \(offset / blockSize) of \(ServerReport.humanSize(blockSize)), bytes \(offset)..<\(offset + UInt64(count))"
                return "the destination differs from the source first in \(block)"
            }
            offset += UInt64(count)
        }
        return regionText
    }
}

extension CopyData {
    /// The bytes gathered, for comparing small reads.
    var bytes: [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(count)
        withBytes(of: 0..<count) { out.append(contentsOf: $0) }
        return out
    }
}
