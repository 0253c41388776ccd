@_spi(NBDMachines) import NBDCore
import NBDSystem
import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Reads a READ's data from the socket straight into its destination.
///
/// SwiftNIO reads into buffers of its own, from which the data would be copied once more to
/// where the caller wants it; libnbd and go-nbd `recv` straight into the caller's buffer. So
/// when a connection carries the NBD stream in clear, SwiftNIO mostly tells the client
/// handler that the socket is readable, reading only a little itself (``wakeupReadSize``),
/// and the handler reads the rest: on the event loop, inside `channelRead`, from the
/// non-blocking socket. The data of a large READ chunk goes straight into the READ's
/// destination; other bytes go into batch buffers, parsed and copied as before.
///
/// Only while the channel is open: SwiftNIO closes the descriptor on the same event loop.
struct DirectRead {
    let socket: NIOBSDSocket.Handle

    /// A reply chunk header (extended, the larger) and the offset of an OFFSET_DATA chunk:
    /// what the handler reads after a large chunk, so that the data of a next one mostly
    /// stays in the socket.
    static let headerSize = ExtendedReplyHeader.size + 8

    /// Size of SwiftNIO's reads: the replies to a burst of writes fit, and the data of a
    /// large READ chunk after its header is mostly left in the socket.
    static let wakeupReadSize = 4 << 10

    /// Smallest READ chunk (or simple reply) whose data is read straight into place. Below
    /// it a copy costs less than the extra reads: smaller replies are read in batches.
    static let largeChunk = 64 << 10

    /// Size of a read of replies other than large READ chunks.
    static let batchSize = 256 << 10

    /// Reads in a row before the event loop gets to its other work.
    static let readsPerEvent = 4

    /// Reads what the socket has now, up to the size of `room`. Answers 0 when nothing is
    /// there, when the server closed the connection, or on an error: SwiftNIO's next read
    /// finds the same end or error and reports it.
    func read(into room: UnsafeMutableRawBufferPointer) -> Int {
        while true {
            let count = CLibrary.read(socket, room.baseAddress, room.count)
            if count >= 0 { return count }
            if errno != EINTR { return 0 }
        }
    }
}
