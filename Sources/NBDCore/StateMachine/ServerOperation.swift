import NIOCore

/// What a backend does for one request. The server's transmission machine decides it from the
/// request and the export (what FUA, FAST_ZERO and REQ_ONE mean, what needs no call at all);
/// the caller only makes the calls.
@_spi(NBDMachines) public enum ServerOperation: Sendable {
    /// Read `length` bytes at `offset`; with `sparse`, holes may be answered as holes.
    case read(offset: UInt64, length: Int, sparse: Bool)
    /// Write the buffers one after another from `offset`; with `fua`, durable before the reply.
    case write([ByteBuffer], offset: UInt64, fua: Bool)
    /// Make every completed write durable.
    case flush
    /// Discard the range; then, with `flush`, make it durable before the reply.
    case trim(offset: UInt64, length: UInt64, flush: Bool)
    /// Make the range read as zeroes (allocated with `noHole`); then, with `flush`, durable.
    case zero(offset: UInt64, length: UInt64, noHole: Bool, flush: Bool)
    /// The extents from `offset`, covering at least one byte of the `length` asked for.
    case blockStatus(offset: UInt64, length: UInt64)
    /// Change the export's size to `size` (`NBD_CMD_RESIZE`); then, with `flush`, make the
    /// change durable before the reply.
    case resize(to: UInt64, flush: Bool)

    /// The bytes of the export the operation touches, or nil for one that touches none in
    /// particular (a flush) or changes the size itself (a resize).
    public var range: Range<UInt64>? {
        switch self {
        case .read(let offset, let length, _): offset..<offset + UInt64(length)
        case .write(let data, let offset, _): offset..<offset + UInt64(data.reduce(0) { $0 + $1.readableBytes })
        case .trim(let offset, let length, _), .zero(let offset, let length, _, _), .blockStatus(let offset, let length):
            offset..<offset + length
        case .flush, .resize: nil
        }
    }
}
