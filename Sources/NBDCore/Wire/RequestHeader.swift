import NIOCore

/// A transmission-phase request ("Request message"). Compact: magic, 16 bits flags, 16 bits
/// type, 64 bits cookie, 64 bits offset, 32 bits length (28 bytes). Extended, once
/// `NBD_OPT_EXTENDED_HEADERS` is agreed: the same with another magic and a 64-bit length
/// (32 bytes). A WRITE's data follows; with extended headers, so does any payload flagged
/// `NBD_CMD_FLAG_PAYLOAD_LEN`.
@_spi(NBDMachines) public struct RequestHeader: Hashable, Sendable {
    /// Command flags.
    public var flags: CommandFlags
    /// The command.
    public var type: CommandType
    /// The client's handle for matching the reply.
    public var cookie: NBDCookie
    /// Export offset in bytes.
    public var offset: UInt64
    /// Length in bytes: of the payload that follows (a WRITE, or with
    /// `NBD_CMD_FLAG_PAYLOAD_LEN`), otherwise of the part of the export the command acts on.
    /// Only an extended request carries more than 32 bits.
    public var length: UInt64

    /// A request header with the given fields.
    public init(flags: CommandFlags = [], type: CommandType, cookie: NBDCookie, offset: UInt64, length: UInt64) {
        self.flags = flags
        self.type = type
        self.cookie = cookie
        self.offset = offset
        self.length = length
    }

    /// Bytes of a compact request on the wire.
    public static let size = 28
    /// Bytes of an extended request on the wire.
    public static let extendedSize = 32

    /// Bytes on the wire in `format`.
    public static func size(in format: TransmissionFormat) -> Int { format == .extended ? extendedSize : size }

    /// Encodes the 28-byte compact header; `length` must fit in 32 bits.
    public func encode(into buffer: inout ByteBuffer) {
        precondition(length <= UInt32.max, "a compact request carries a 32-bit length")
        buffer.writeMultipleIntegers(NBDMagic.request, flags.rawValue, type.rawValue, cookie.rawValue, offset, UInt32(length))
    }

    /// Encodes the header as `format` frames it (32 bytes extended, 28 otherwise).
    public func encode(into buffer: inout ByteBuffer, format: TransmissionFormat) {
        guard format == .extended else { return encode(into: &buffer) }
        buffer.writeMultipleIntegers(NBDMagic.extendedRequest, flags.rawValue, type.rawValue, cookie.rawValue, offset, length)
    }

    /// The number of payload bytes that follow the header: a WRITE's data, or with extended
    /// headers whatever `NBD_CMD_FLAG_PAYLOAD_LEN` announces. A WRITE's data follows it with or
    /// without the flag: the spec says the flag "MUST be set for NBD_CMD_WRITE", but qemu 10
    /// sends extended writes without it, and a WRITE's length can only be its payload's.
    public func payloadLength(in format: TransmissionFormat) -> UInt64 {
        if type == .write || (format == .extended && flags.contains(.payloadLength)) { return length }
        return 0
    }

    /// Decodes a compact header (the server side); nil when more bytes are needed.
    public static func decode(from buffer: inout ByteBuffer) throws(NBDError) -> RequestHeader? {
        try decode(from: &buffer, format: .structured)
    }

    /// Decodes a header framed as `format` (the server side); nil when more bytes are needed.
    /// A header of the other size is a violation: "the client MUST use the 32-byte extended
    /// request header" once extended headers are agreed, and the compact one otherwise.
    public static func decode(from buffer: inout ByteBuffer, format: TransmissionFormat) throws(NBDError) -> RequestHeader? {
        guard let magic = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self) else { return nil }
        let expected = format == .extended ? NBDMagic.extendedRequest : NBDMagic.request
        guard magic == expected else {
            if magic == NBDMagic.request || magic == NBDMagic.extendedRequest {
                let kind = magic == NBDMagic.request ? "compact" : "extended"
                let agreed = format == .extended ? "were" : "were not"
                throw .clientViolation("\(kind) request header although extended headers \(agreed) negotiated")
            }
            throw .clientViolation("request with bad magic 0x\(String(magic, radix: 16))")
        }
        guard buffer.readableBytes >= size(in: format),
            let (_, flags, type, cookie, offset) = buffer.readMultipleIntegers(as: (UInt32, UInt16, UInt16, UInt64, UInt64).self),
            let length = format == .extended ? buffer.readInteger(as: UInt64.self) : buffer.readInteger(as: UInt32.self).map(UInt64.init)
        else { return nil }
        return RequestHeader(
            flags: CommandFlags(rawValue: flags),
            type: CommandType(rawValue: type),
            cookie: NBDCookie(cookie),
            offset: offset,
            length: length
        )
    }
}
