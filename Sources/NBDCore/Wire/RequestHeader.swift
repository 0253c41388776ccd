import NIOCore

/// A transmission-phase request ("Request message"): magic, 16 bits flags, 16 bits type,
/// 64 bits cookie, 64 bits offset, 32 bits length; a WRITE's data follows.
public struct RequestHeader: Hashable, Sendable {
    /// Command flags.
    public var flags: CommandFlags
    /// The command.
    public var type: CommandType
    /// The client's handle for matching the reply.
    public var cookie: UInt64
    /// Export offset in bytes.
    public var offset: UInt64
    /// Length in bytes (of the data that follows, for a WRITE).
    public var length: UInt32

    /// A request header with the given fields.
    public init(flags: CommandFlags = [], type: CommandType, cookie: UInt64, offset: UInt64, length: UInt32) {
        self.flags = flags
        self.type = type
        self.cookie = cookie
        self.offset = offset
        self.length = length
    }

    /// Bytes on the wire.
    public static let size = 28

    /// Encodes the 28-byte header.
    public func encode(into buffer: inout ByteBuffer) {
        buffer.writeMultipleIntegers(NBDMagic.request, flags.rawValue, type.rawValue, cookie, offset, length)
    }

    /// Decodes a header (the server side); nil when more bytes are needed.
    public static func decode(from buffer: inout ByteBuffer) throws(NBDError) -> RequestHeader? {
        try buffer.rewindingOnNil { (buffer) throws(NBDError) -> RequestHeader? in
            guard
                let (magic, flags, type, cookie, offset, length) =
                    buffer.readMultipleIntegers(as: (UInt32, UInt16, UInt16, UInt64, UInt64, UInt32).self)
            else { return nil }
            guard magic == NBDMagic.request else { throw .clientViolation("request with bad magic 0x\(String(magic, radix: 16))") }
            return RequestHeader(
                flags: CommandFlags(rawValue: flags),
                type: CommandType(rawValue: type),
                cookie: cookie,
                offset: offset,
                length: length
            )
        }
    }
}
