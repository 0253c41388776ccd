import NIOCore

/// A request whose header arrived and whose payload is still arriving: a WRITE's data, or
/// (with extended headers) any payload flagged `NBD_CMD_FLAG_PAYLOAD_LEN`. The data is kept as the
/// slices of the receive buffers it came in, so that it is copied only once, into the backend;
/// but never more than a few: past them, the pieces are gathered into one buffer of the
/// payload's size, so that a client sending its data a byte at a time cannot make the server
/// hold a receive buffer per byte.
package struct PendingWrite: Sendable {
    package let header: RequestHeader
    package private(set) var segments: [ByteBuffer] = []
    private var isGathered = false
    private var received = 0

    /// Slices kept as they are before the data is gathered.
    package static let maximumSegments = 8

    package init(_ header: RequestHeader) {
        self.header = header
    }

    /// Bytes still to come.
    package var missing: Int { Int(header.length) - received }

    package mutating func append(_ bytes: ByteBuffer) {
        received += bytes.readableBytes
        if isGathered {
            segments[0].writeImmutableBuffer(bytes)
        } else if segments.count < Self.maximumSegments {
            segments.append(bytes)
        } else {
            segments = [(segments + [bytes]).gathered(capacity: Int(header.length))]
            isGathered = true
        }
    }
}
