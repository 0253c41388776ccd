import NIOCore

// How every machine keeps the bytes it has received and not yet parsed.
extension ByteBuffer {
    /// Appends `bytes` from the socket. When nothing is left over they are taken as they came,
    /// not copied: a READ's or a WRITE's data then goes on as a slice of the receive buffer.
    @inlinable package mutating func appendReceived(_ bytes: ByteBuffer) {
        if readableBytes == 0 {
            self = bytes
        } else {
            var bytes = bytes
            writeBuffer(&bytes)
        }
    }

    /// Lets go of a receive buffer that has been read to its end: SwiftNIO reuses it for the
    /// next read only when nothing else holds it.
    @inlinable package mutating func releaseIfRead() {
        if readableBytes == 0 { self = ByteBuffer() }
    }
}
