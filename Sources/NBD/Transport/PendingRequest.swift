@_spi(NBDMachines) import NBDCore
import NIOCore

/// One request on its way: what to send, where a READ's bytes go, what a BLOCK_STATUS
/// collects, and the continuation of its caller. Made by the caller; from then on its mutable
/// state is touched only on the channel's event loop (hence `@unchecked Sendable`).
final class PendingRequest: @unchecked Sendable {
    typealias Answer = [UInt32: [BlockDescriptor]]

    let type: CommandType
    let flags: CommandFlags
    let offset: UInt64
    let length: UInt64
    /// For a BLOCK_STATUS limited to some contexts (extended headers' payload form): their ids.
    let onlyContexts: [UInt32]?
    /// A WRITE's data, sent one buffer after another; let go once handed to the channel, so
    /// that buffers are not kept until the reply.
    private(set) var payload: [ByteBuffer]
    /// Where a READ's data lands; dropped before the caller is answered, so that the caller
    /// holds the only reference to its buffer and can reuse it without a copy.
    private(set) var destination: ReadDestination?
    /// A BLOCK_STATUS's extents, by context id.
    var extents: [UInt32: [BlockDescriptor]] = [:]
    /// The waiting caller, answered with the extents of a BLOCK_STATUS by context id (empty
    /// for the rest); nil before the caller waits and once it was answered (completed, failed
    /// or cancelled). Unsafe: the checked kind costs an object a request, and ``succeed()``
    /// and ``fail(_:)`` answer it once; the connection's machine answers every request it is
    /// given, as it fulfilled the promise that was here before.
    var caller: UnsafeContinuation<Answer, any Error>?
    /// Run on the event loop as a success is answered, in the order replies come.
    var whenAnswered: (@Sendable () -> Void)?

    init(
        _ type: CommandType,
        flags: CommandFlags,
        offset: UInt64,
        length: UInt64,
        onlyContexts: [UInt32]? = nil,
        payload: [ByteBuffer] = [],
        destination: ReadDestination? = nil
    ) {
        self.type = type
        self.flags = flags
        self.offset = offset
        self.length = length
        self.onlyContexts = onlyContexts
        self.payload = payload
        self.destination = destination
    }

    /// The WRITE's data, for sending: all of it (`range` nil), or the bytes `range` of it for
    /// one piece, as slices. The request lets go of the data once its end is sent, so that
    /// buffers are not kept until the reply.
    func takePayload(_ range: Range<Int>?) -> [ByteBuffer] {
        guard let range else {
            defer { payload = [] }
            return payload
        }
        var slices: [ByteBuffer] = []
        var start = 0
        for buffer in payload {
            let end = start + buffer.readableBytes
            defer { start = end }
            guard end > range.lowerBound, start < range.upperBound else { continue }
            let from = max(start, range.lowerBound) - start
            let to = min(end, range.upperBound) - start
            slices.append(buffer.getSlice(at: buffer.readerIndex + from, length: to - from)!)
        }
        if range.upperBound >= Int(length) { payload = [] }
        return slices
    }

    func succeed() {
        destination = nil
        guard let caller else { return }
        self.caller = nil
        whenAnswered?()
        caller.resume(returning: extents)
    }

    func fail(_ error: any Error) {
        destination = nil
        guard let caller else { return }
        self.caller = nil
        caller.resume(throwing: error)
    }
}

/// The buffer a READ (or the pieces of a split READ) fills in place, as data arrives.
/// Touched only on the event loop until every piece has completed.
final class ReadDestination: @unchecked Sendable {
    private var buffer: ByteBuffer
    /// Export offset of the byte at `start`.
    let exportOffset: UInt64
    /// Index in `buffer` where the read's bytes begin.
    let start: Int
    let length: Int
    /// For a read into a new buffer, before any byte arrived: the room is not made yet, because
    /// data that arrives whole can be kept as it came, without a copy.
    private var isPending: Bool
    /// For a read that keeps its data as it arrives: the pieces, in export order while they
    /// come in it (as they nearly always do); `nextOffset` is where the next one would go.
    private var segments: [ByteBuffer]?
    private var nextOffset: UInt64
    /// The pieces by export offset, once one came out of order (a structured reply may send
    /// its chunks in any order).
    private var unordered: [(offset: UInt64, bytes: ByteBuffer)] = []

    /// Appends `length` bytes of room to `buffer`, to be filled by the read at `exportOffset`.
    init(appendingTo buffer: consuming ByteBuffer, exportOffset: UInt64, length: Int) {
        self.buffer = buffer
        self.exportOffset = exportOffset
        self.length = length
        start = self.buffer.writerIndex
        isPending = false
        nextOffset = exportOffset
        makeRoom()
    }

    /// A read of `length` bytes at `exportOffset` into a buffer of its own.
    init(exportOffset: UInt64, length: Int, allocator: ByteBufferAllocator) {
        self.buffer = allocator.buffer(capacity: 0)
        self.exportOffset = exportOffset
        self.length = length
        start = 0
        isPending = true
        nextOffset = exportOffset
    }

    /// A read of `length` bytes at `exportOffset` whose data is kept in the pieces it arrives in.
    init(segmentsOf length: Int, exportOffset: UInt64) {
        self.buffer = ByteBuffer()
        self.exportOffset = exportOffset
        self.length = length
        start = 0
        isPending = false
        nextOffset = exportOffset
        segments = []
    }

    /// Smallest read whose data is kept as the slice of the receive buffer it arrived in: the
    /// slice keeps the whole receive buffer (up to 1 MiB) alive, which small reads should not.
    static let smallestSharedRead = 128 << 10

    private func makeRoom() {
        isPending = false
        buffer.reserveCapacity(minimumWritableBytes: length)
        // The room is filled exactly: the state machine checks that a successful read covers
        // every byte, and a failed read gives the buffer back without it.
        buffer.moveWriterIndex(forwardBy: length)
    }

    func write(_ bytes: ByteBuffer, at offset: UInt64) {
        if segments != nil {
            keep(bytes, at: offset)
            return
        }
        if isPending {
            if offset == exportOffset, bytes.readableBytes == length, length >= Self.smallestSharedRead {
                // The whole read in one piece: no copy.
                isPending = false
                buffer = bytes
                return
            }
            makeRoom()
        }
        buffer.setBuffer(bytes, at: index(of: offset))
    }

    /// Whether data lands in one buffer, so that it can be read straight into place; segments
    /// are kept as they arrive instead.
    var fillsInPlace: Bool { segments == nil }

    /// Lets `read` put up to `count` bytes, for export `offset` on, straight into place (only
    /// when ``fillsInPlace``). `read` answers how many it put, or 0 or less for none; that is
    /// the answer here too.
    func receive(at offset: UInt64, count: Int, using read: (UnsafeMutableRawBufferPointer) -> Int) -> Int {
        precondition(fillsInPlace, "segments are kept as they arrive")
        if isPending { makeRoom() }
        let at = index(of: offset) - buffer.readerIndex
        return buffer.withUnsafeMutableReadableBytes { readable in
            read(UnsafeMutableRawBufferPointer(rebasing: readable[at...].prefix(count)))
        }
    }

    func zero(at offset: UInt64, length: Int) {
        if segments != nil {
            keep(ByteBuffer(repeating: 0, count: length), at: offset)
            return
        }
        if isPending { makeRoom() }
        buffer.setRepeatingByte(0, count: length, at: index(of: offset))
    }

    /// Keeps a piece of a read whose data is kept as it arrives.
    private func keep(_ bytes: ByteBuffer, at offset: UInt64) {
        if unordered.isEmpty, offset == nextOffset {
            segments!.append(bytes)
            nextOffset += UInt64(bytes.readableBytes)
            return
        }
        if unordered.isEmpty {
            var position = exportOffset
            for piece in segments! {
                unordered.append((position, piece))
                position += UInt64(piece.readableBytes)
            }
        }
        unordered.append((offset, bytes))
    }

    /// Where the byte at export `offset` goes in `buffer`.
    private func index(of offset: UInt64) -> Int {
        start + Int(offset - exportOffset)
    }

    /// Moves the buffer out, leaving this object empty.
    func take() -> ByteBuffer {
        var taken = ByteBuffer()
        swap(&taken, &buffer)
        return taken
    }

    /// Moves the pieces out in export order (a structured reply may send its chunks in any
    /// order), leaving this object empty.
    func takeSegments() -> [ByteBuffer] {
        defer {
            segments = []
            unordered = []
        }
        guard !unordered.isEmpty else { return segments ?? [] }
        return unordered.sorted { $0.offset < $1.offset }.map(\.bytes)
    }
}
