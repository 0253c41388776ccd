import NIOCore
import NBDCore

/// One request on its way: what to send, where a READ's bytes go, what a BLOCK_STATUS
/// collects, and the promise of its caller. Made by the caller; from then on its mutable state
/// is touched only on the channel's event loop (hence `@unchecked Sendable`).
final class PendingRequest: @unchecked Sendable {
    let type: CommandType
    let flags: CommandFlags
    let offset: UInt64
    let length: UInt32
    /// A WRITE's data.
    let payload: ByteBuffer?
    /// Where a READ's data lands; dropped before the caller is answered, so that the caller
    /// holds the only reference to its buffer and can reuse it without a copy.
    private(set) var destination: ReadDestination?
    /// A BLOCK_STATUS's extents, by context id.
    var extents: [UInt32: [BlockDescriptor]] = [:]
    /// The caller's answer: the extents of a BLOCK_STATUS by context id, empty for the rest.
    let future: EventLoopFuture<[UInt32: [BlockDescriptor]]>
    /// Nil once the caller was answered (completed, failed or cancelled).
    private(set) var promise: EventLoopPromise<[UInt32: [BlockDescriptor]]>?

    init(_ type: CommandType, flags: CommandFlags, offset: UInt64, length: UInt32, payload: ByteBuffer? = nil,
         destination: ReadDestination? = nil, promise: EventLoopPromise<[UInt32: [BlockDescriptor]]>) {
        self.type = type
        self.flags = flags
        self.offset = offset
        self.length = length
        self.payload = payload
        self.destination = destination
        self.promise = promise
        self.future = promise.futureResult
    }

    func succeed() {
        destination = nil
        promise?.succeed(extents)
        promise = nil
    }

    func fail(_ error: any Error) {
        destination = nil
        promise?.fail(error)
        promise = nil
    }
}

/// The buffer a READ (or the pieces of a split READ) fills in place, as data arrives.
/// Touched only on the event loop until every piece has completed.
final class ReadDestination: @unchecked Sendable {
    var buffer: ByteBuffer
    /// Export offset of the byte at `start`.
    let exportOffset: UInt64
    /// Index in `buffer` where the read's bytes begin.
    let start: Int

    /// Appends `length` bytes of room to `buffer`, to be filled by the read at `exportOffset`.
    init(appendingTo buffer: consuming ByteBuffer, exportOffset: UInt64, length: Int) {
        buffer.reserveCapacity(minimumWritableBytes: length)
        start = buffer.writerIndex
        // The room is filled exactly: the state machine checks that a successful read covers
        // every byte, and a failed read gives the buffer back without it.
        buffer.moveWriterIndex(forwardBy: length)
        self.buffer = buffer
        self.exportOffset = exportOffset
    }

    func write(_ bytes: ByteBuffer, at offset: UInt64) {
        buffer.setBuffer(bytes, at: start + Int(offset - exportOffset))
    }

    /// Moves the buffer out, leaving this object empty.
    func take() -> ByteBuffer {
        var taken = ByteBuffer()
        swap(&taken, &buffer)
        return taken
    }

    func zero(at offset: UInt64, length: Int) {
        buffer.setRepeatingByte(0, count: length, at: start + Int(offset - exportOffset))
    }
}
