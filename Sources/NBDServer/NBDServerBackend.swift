@_spi(NBDMachines) import NBDCore
import NIOCore

/// The storage behind an export: what `NBDServer` needs to serve it.
///
/// Implement it to serve anything over NBD; ``MemoryBackend`` is one. Every method may be
/// called from many tasks at once. Ranges are already checked against ``size`` and
/// ``isReadOnly`` when they arrive here. On an export made resizable
/// (``NBDServerExport/maximumSize``) the server never runs ``resize(to:)`` beside another
/// call, nor asks for more than that maximum: the others wait for it, and are checked against
/// the new size.
///
/// The methods are called on the thread of the client's connection, so that a fast backend
/// answers without a thread hop. Do not block it: blocking I/O belongs on a thread pool, as
/// ``FileBackend`` does with `NIOThreadPool`.
public protocol NBDServerBackend: Sendable {
    /// Size in bytes; after a ``resize(to:)``, the new size.
    var size: UInt64 { get }
    /// Writes, trims and zeroes are refused with `EPERM`.
    var isReadOnly: Bool { get }
    /// A flush on one connection covers writes made on any other (advertises multi-conn).
    var flushCoversAllConnections: Bool { get }
    /// Reads `length` bytes at `offset`.
    func read(at offset: UInt64, length: Int) async throws -> ByteBuffer
    /// Writes `data` at `offset`; with `fua`, it is durable before returning.
    func write(_ data: ByteBuffer, at offset: UInt64, fua: Bool) async throws
    /// Writes the buffers one after another from `offset`: a WRITE's data as it arrived, in
    /// a few pieces. The default gathers them into one buffer for ``write(_:at:fua:)``; a
    /// backend that copies the data anyway can take the pieces as they are.
    func write(segments: [ByteBuffer], at offset: UInt64, fua: Bool) async throws
    /// Zeroing is faster than writing zeroes (`NBD_CMD_FLAG_FAST_ZERO` succeeds).
    var zeroIsFast: Bool { get }
    /// Makes every completed write durable.
    func flush() async throws
    /// The range is no longer needed (it may read back as anything until written).
    func trim(at offset: UInt64, length: UInt64) async throws
    /// The range reads as zeroes afterwards; with `noHole`, it stays allocated.
    func zero(at offset: UInt64, length: UInt64, noHole: Bool) async throws
    /// Consecutive extents from `offset` covering at least one byte, as `base:allocation` flags.
    func extents(at offset: UInt64, length: UInt64) async throws -> [BlockDescriptor]
    /// Reads `length` bytes at `offset` as data and holes in order, so that a structured reply
    /// can skip the holes. The default reads everything as data.
    func readSparse(at offset: UInt64, length: Int) async throws -> [NBDServerReadPart]
    /// Changes the size to `size` (`NBD_CMD_RESIZE`, an experimental extension): a grow adds
    /// bytes that read as zeroes, a shrink drops what is past the new end. Throw
    /// ``NBDServerError`` with `ENOSPC` when there is no room to grow, `EPERM` when the storage
    /// cannot change size. The default refuses with `EPERM`.
    func resize(to size: UInt64) async throws
}

extension NBDServerBackend {
    public func write(segments: [ByteBuffer], at offset: UInt64, fua: Bool) async throws {
        guard segments.count > 1 else {
            try await write(segments.first ?? ByteBuffer(), at: offset, fua: fua)
            return
        }
        try await write(segments.gathered(capacity: segments.reduce(0) { $0 + $1.readableBytes }), at: offset, fua: fua)
    }

    public func readSparse(at offset: UInt64, length: Int) async throws -> [NBDServerReadPart] {
        [.data(try await read(at: offset, length: length))]
    }

    public func resize(to size: UInt64) async throws {
        throw NBDServerError(.EPERM, "this export cannot change size")
    }
}

/// An error a backend throws to send a particular NBD error value to the client.
public struct NBDServerError: Error, Sendable {
    public var errno: NBDErrno
    public var message: String
    /// An error with its value and a message for the client.
    public init(_ errno: NBDErrno, _ message: String) {
        self.errno = errno
        self.message = message
    }
}

extension BlockDescriptor {
    /// Most extents a backend puts in one answer to block status: the client asks again from
    /// where the answer ends.
    static let mostInOneAnswer = 1 << 16
}
