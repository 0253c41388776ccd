import NIOCore

/// One part of a sparse read, in order: what a server's backend reads.
public enum NBDServerReadPart: Sendable {
    /// Bytes of data.
    case data(ByteBuffer)
    /// This many bytes that read as zeroes.
    case hole(Int)
}
