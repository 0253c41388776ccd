#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import NIOCore

/// Reads a READ's data from the socket straight into its destination.
///
/// SwiftNIO reads into buffers of its own, from which the data would be copied once more to
/// where the caller wants it; libnbd and go-nbd `recv` straight into the caller's buffer. So
/// when a connection carries the NBD stream in clear and the next bytes are a reply's data,
/// the client handler reads them itself: on the event loop, inside `channelRead`, from the
/// non-blocking socket SwiftNIO also reads. SwiftNIO's reads are kept small
/// (``receiveBufferSize``), so they carry the headers and leave the data to direct reads.
///
/// Only while the channel is open: SwiftNIO closes the descriptor on the same event loop.
struct DirectRead {
    let socket: NIOBSDSocket.Handle

    /// Size of SwiftNIO's reads once direct reads are on: about a reply header and a little
    /// data, so that the rest of a large READ reply is read straight into place.
    static let receiveBufferSize = 4 << 10

    /// Size of a direct read of replies without large data, which are then copied as usual.
    static let batchSize = 256 << 10

    /// Direct reads in a row before the event loop gets to its other work.
    static let readsPerEvent = 16

    /// Reads what the socket has now, up to the size of `room`. Answers 0 when nothing is
    /// there, when the server closed the connection, or on an error: SwiftNIO's next read
    /// finds the same end or error and reports it.
    func read(into room: UnsafeMutableRawBufferPointer) -> Int {
        while true {
            let count = systemRead(socket, room.baseAddress, room.count)
            if count >= 0 { return count }
            if errno != EINTR { return 0 }
        }
    }
}
