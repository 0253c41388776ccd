import NBD
import NBDCopy

/// `nbd copy --verify`: reads the destination back over new connections and checks that it
/// has the source's blkhash; the library names the first block that differs.
struct Verifier {
    let copy: Copy
    let configuration: NBDClient.Configuration

    func check(source: any CopySource, against hash: BlockHash, stop: CopyStop) async throws {
        var hashing = configuration
        // Hashed and dropped: taken as it arrived, in SwiftNIO's large reads.
        hashing.connection.readsDataDirectly = false
        var options = CopyOptions()
        options.requestSize = copy.requestSize
        options.requests = copy.requests
        options.memory = copy.memory
        let verified = try await Endpoints.withSource(
            copy.destination,
            connections: copy.connections,
            requests: copy.requests,
            configuration: hashing
        ) { readBack in
            try await verify(readBack, matches: hash, source: source, options: options, stop: stop)
        }
        if verified {
            StandardStreams.error("nbd: verified: the destination reads back with the source's blkhash (\(hash.specification))\n")
        }
    }
}
