import NBD
import NIOCore

/// An export, read and written through any `NBDExportAccess`: an `NBDClient` (several
/// connections when the server allows multi-conn, and, with the client's reconnect delay,
/// riding out a server restart) or one `NBDExport` connection. A source skips the zero areas
/// that block status reports; with a dirty bitmap, it is the source of an incremental copy.
public final class NBDEndpoint: CopySource, CopyDestination {
    /// What the endpoint reads and writes through: the caller's, or the client made by
    /// ``open(_:connections:requests:destinationIsZero:bitmap:allocates:configuration:onEvent:)``,
    /// running until ``close()``.
    public let export: any NBDExportAccess
    /// What the server said of the export.
    public let info: NBDExportInfo
    public let startsZeroed: Bool
    /// The dirty-bitmap context whose clean extents an incremental copy skips.
    public let bitmap: NBDMetaContext?
    /// Zeroes are written with NBD_CMD_FLAG_NO_HOLE: `--allocated`.
    public let allocates: Bool
    /// Connections up when the endpoint was opened.
    public let connections: Int
    private let hasAllocation: Bool
    private let isTLS: Bool
    /// The run() of the client that `open` made, until close(); nil for the caller's export.
    private let runner: Task<Void, any Error>?
    public var isSequential: Bool { false }
    public var readsOffThread: Bool { true }
    public var size: UInt64? { info.size }
    public var hasCleanRanges: Bool { bitmap != nil }
    public var cleanRangesName: String? { bitmap?.name }
    public var connectionCount: Int? { connections }
    public var preferredRequestSize: UInt64? { UInt64(info.blockSizes.preferred) }
    public var isReconnecting: Bool? { export.isReconnecting }

    /// Opens the export at `uri` through an `NBDClient` of its own, which ``close()`` ends:
    /// throws when the first connection cannot be made or the bitmap is missing.
    ///
    /// - Parameters:
    ///   - uri: the export.
    ///   - connections: connections to open when the server allows multi-conn (one otherwise).
    ///   - requests: requests in flight per connection.
    ///   - destinationIsZero: as a destination, the export is known to read as zeroes already
    ///     (nbdcopy's `--target-is-zero`): zero areas of the source are skipped.
    ///   - bitmap: as a source, copy only what this dirty bitmap marks dirty (an incremental
    ///     copy, onto a full copy made earlier); see `NBDMetaContext.dirtyBitmap(_:)`.
    ///   - allocates: as a destination, zeroes are written with `NBD_CMD_FLAG_NO_HOLE`.
    ///   - base: the client's configuration (TLS, reconnect delay, timeouts);
    ///     `connections`, `requests` and `bitmap` are set on it.
    ///   - onEvent: hears what happens to the connections (lost, reconnected).
    public static func open(
        _ uri: NBDURI,
        connections: Int = 4,
        requests: Int = 64,
        destinationIsZero: Bool = false,
        bitmap: NBDMetaContext? = nil,
        allocates: Bool = false,
        configuration base: NBDClient.Configuration = NBDClient.Configuration(),
        onEvent: @escaping @Sendable (NBDClientEvent) -> Void = { _ in }
    ) async throws -> NBDEndpoint {
        var configuration = base
        configuration.connections = max(1, connections)
        configuration.connection.maximumRequestsInFlight = requests
        if let bitmap { configuration.connection.metaContexts.append(bitmap) }
        let client = NBDClient(uri, configuration: configuration)
        // The events end when run() returns: the listener ends with the runner, which close()
        // awaits.
        let runner = Task {
            async let listening: Void = { for await event in client.events { onEvent(event) } }()
            try await client.run()
            await listening
        }
        do {
            return try await NBDEndpoint(
                client,
                destinationIsZero: destinationIsZero,
                bitmap: bitmap,
                allocates: allocates,
                runner: runner
            )
        } catch {
            runner.cancel()
            _ = await runner.result
            throw error
        }
    }

    /// The caller's export (an `NBDClient` that runs, or an `NBDExport`), which stays the
    /// caller's: ``close()`` leaves it open. Throws when `bitmap` was not negotiated.
    ///
    /// - Parameters:
    ///   - export: where to read and write.
    ///   - destinationIsZero: as a destination, the export reads as zeroes already.
    ///   - bitmap: as a source, copy only what this dirty bitmap marks dirty; the export must
    ///     have negotiated it.
    ///   - allocates: as a destination, zeroes are written with `NBD_CMD_FLAG_NO_HOLE`.
    public convenience init(
        _ export: any NBDExportAccess,
        destinationIsZero: Bool = false,
        bitmap: NBDMetaContext? = nil,
        allocates: Bool = false
    ) async throws {
        try await self.init(export, destinationIsZero: destinationIsZero, bitmap: bitmap, allocates: allocates, runner: nil)
    }

    private init(
        _ export: any NBDExportAccess,
        destinationIsZero: Bool,
        bitmap: NBDMetaContext?,
        allocates: Bool,
        runner: Task<Void, any Error>?
    ) async throws {
        let contexts = try await export.metaContexts
        if let bitmap, !contexts.contains(bitmap) {
            throw NBDCopyError(
                .unsupported,
                "the source does not offer the metadata context \(bitmap.name) (qemu-nbd -B NAME exports a bitmap)"
            )
        }
        self.export = export
        self.info = try await export.info
        self.startsZeroed = destinationIsZero
        self.bitmap = bitmap
        self.allocates = allocates
        self.connections = export.connectionCount
        self.hasAllocation = contexts.contains(.baseAllocation)
        self.isTLS = try await export.tlsVersion != nil
        self.runner = runner
    }

    /// Where worker `worker` runs best: on the thread of a connection, one per worker in turn.
    public func taskExecutor(for worker: Int) -> (any TaskExecutor)? { export.taskExecutor(for: worker % connections) }

    public func zeroRanges(from offset: UInt64, length: UInt64) async throws -> [Range<UInt64>] {
        guard hasAllocation else { return [] }
        var ranges: [Range<UInt64>] = []
        for try await extent in export.extents(of: .baseAllocation, in: offset..<offset + length) {
            guard case .allocation(let flags) = extent.status, flags.contains(.zero) else { continue }
            ranges.append(extent.range)
        }
        return ranges
    }

    public func cleanRanges(from offset: UInt64, length: UInt64) async throws -> [Range<UInt64>] {
        guard let bitmap else { return [] }
        var ranges: [Range<UInt64>] = []
        // In a qemu:dirty-bitmap context, status bit 0 set means dirty (qemu's docs/interop/nbd.rst).
        for try await extent in export.extents(of: bitmap, in: offset..<offset + length) where extent.flags & 1 == 0 {
            ranges.append(extent.range)
        }
        return ranges
    }

    nonisolated(nonsending) public func read(into buffer: inout ByteBuffer, at offset: UInt64, length: Int, worker: Int) async throws {
        // In clear, the data goes from the socket straight into `buffer` (as libnbd reads):
        // nothing else holds it, not even SwiftNIO's receive buffers.
        try await export.read(into: &buffer, at: offset, length: UInt64(length), flags: [])
    }

    nonisolated(nonsending) public func readSegments(at offset: UInt64, length: Int, worker: Int) async throws -> [ByteBuffer]? {
        // Over TLS the data comes out of the decryption in records of 16 KiB: gathering them
        // costs less than passing on so many small pieces.
        guard !isTLS else { return [try await export.read(at: offset, length: UInt64(length), flags: [])] }
        return try await export.readSegments(at: offset, length: UInt64(length), flags: [])
    }

    nonisolated(nonsending) public func write(_ data: [ByteBuffer], at offset: UInt64, worker: Int) async throws {
        try await export.write(segments: data, at: offset, flags: [])
    }

    nonisolated(nonsending) public func zero(at offset: UInt64, length: UInt64, worker: Int) async throws {
        if info.canZero {
            // NO_HOLE "SHOULD be set to 1 if the client wants to ensure that the server does not
            // create a hole": what --allocated asks for.
            try await export.writeZeroes(at: offset, length: length, flags: allocates ? .noHole : [])
        } else {
            try await export.write(ByteBuffer(repeating: 0, count: Int(length)), at: offset, flags: [])
        }
    }

    /// One flush covers every connection: with several, the server set CAN_MULTI_CONN.
    public func flush() async throws {
        if info.canFlush { try await export.flush() }
    }

    /// Ends the client made by
    /// ``open(_:connections:requests:destinationIsZero:bitmap:allocates:configuration:onEvent:)``;
    /// the caller's export stays open.
    public func close() async {
        guard let runner else { return }
        runner.cancel()
        _ = await runner.result
    }
}
