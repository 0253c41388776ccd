import NBDServer
import NIOConcurrencyHelpers
import NIOCore

/// A memory disk for the built-in server that a test can watch (it counts reads) or make fail
/// (its flush).
struct TestBackend: NBDServerBackend {
    let memory: MemoryBackend
    let reads = NIOLockedValueBox(0)
    /// Every trim and zero performed, as "trim LENGTH" and "zero LENGTH".
    let effects = NIOLockedValueBox<[String]>([])
    var flushError: NBDServerError?

    init(size: UInt64, flushError: NBDServerError? = nil) {
        memory = MemoryBackend(size: size)
        self.flushError = flushError
    }

    var size: UInt64 { memory.size }
    var isReadOnly: Bool { false }
    var flushCoversAllConnections: Bool { true }
    var zeroIsFast: Bool { true }
    func read(at offset: UInt64, length: Int) async throws -> ByteBuffer {
        reads.withLockedValue { $0 += 1 }
        return try await memory.read(at: offset, length: length)
    }
    func write(_ data: ByteBuffer, at offset: UInt64, fua: Bool) async throws { try await memory.write(data, at: offset, fua: fua) }
    func flush() async throws {
        if let flushError { throw flushError }
    }
    func trim(at offset: UInt64, length: UInt64) async throws {
        effects.withLockedValue { $0.append("trim \(length)") }
        try await memory.trim(at: offset, length: length)
    }
    func zero(at offset: UInt64, length: UInt64, noHole: Bool) async throws {
        effects.withLockedValue { $0.append("zero \(length)") }
        try await memory.zero(at: offset, length: length, noHole: noHole)
    }
    func extents(at offset: UInt64, length: UInt64) async throws -> [BlockDescriptor] {
        try await memory.extents(at: offset, length: length)
    }
}
