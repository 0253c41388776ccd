import NIOCore

extension Array where Element == ByteBuffer {
    /// The readable bytes of every buffer, one after another, in one new buffer with room for
    /// `capacity` bytes.
    package func gathered(capacity: Int) -> ByteBuffer {
        var gathered = ByteBuffer()
        gathered.reserveCapacity(capacity)
        for buffer in self { gathered.writeImmutableBuffer(buffer) }
        return gathered
    }
}
