import NIOCore

/// The header of a transmission-phase reply: a simple reply ("Simple reply message": magic,
/// 32 bits error, 64 bits cookie), a structured reply chunk ("Structured reply chunk message":
/// magic, 16 bits flags, 16 bits type, 64 bits cookie, 32 bits payload length) or an extended
/// reply chunk ("Extended reply chunk message": magic, 16 bits flags, 16 bits type, 64 bits
/// cookie, 64 bits offset, 64 bits payload length).
@_spi(NBDMachines) public enum ReplyHeader: Hashable, Sendable {
    case simple(SimpleReplyHeader)
    case structured(StructuredReplyHeader)
    case extended(ExtendedReplyHeader)

    /// The cookie of the request this answers.
    public var cookie: NBDCookie {
        switch self {
        case .simple(let header): header.cookie
        case .structured(let header): header.cookie
        case .extended(let header): header.cookie
        }
    }

    /// Decodes a header that `format` allows; nil when more bytes are needed. With extended
    /// headers "all server replies MUST use an extended reply"; without, an extended one, and
    /// without structured replies a chunk, is a violation too.
    public static func decode(from buffer: inout ByteBuffer, format: TransmissionFormat) throws(NBDError) -> ReplyHeader? {
        guard let magic = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self) else { return nil }
        switch (magic, format) {
        case (NBDMagic.extendedReply, .extended), (NBDMagic.simpleReply, .simple), (NBDMagic.simpleReply, .structured),
            (NBDMagic.structuredReply, .structured):
            return try decode(from: &buffer)
        case (NBDMagic.structuredReply, .simple):
            throw .serverViolation("structured reply chunk although structured replies were not negotiated")
        case (NBDMagic.simpleReply, _), (NBDMagic.structuredReply, _):
            // "If extended headers have been negotiated, a simple reply MUST NOT be used."
            let kind = magic == NBDMagic.simpleReply ? "simple reply" : "structured reply chunk"
            throw .serverViolation("\(kind) although extended headers were negotiated")
        case (NBDMagic.extendedReply, _):
            throw .serverViolation("extended reply chunk although extended headers were not negotiated")
        default:
            return try decode(from: &buffer)
        }
    }

    /// Decodes a header of any kind by its magic; nil when more bytes are needed.
    public static func decode(from buffer: inout ByteBuffer) throws(NBDError) -> ReplyHeader? {
        guard let magic = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self) else { return nil }
        switch magic {
        case NBDMagic.extendedReply:
            guard
                let (_, flags, type, cookie, offset, length) =
                    buffer.readMultipleIntegers(as: (UInt32, UInt16, UInt16, UInt64, UInt64, UInt64).self)
            else { return nil }
            return .extended(
                ExtendedReplyHeader(
                    flags: ReplyFlags(rawValue: flags),
                    type: ReplyChunkType(rawValue: type),
                    cookie: NBDCookie(cookie),
                    offset: offset,
                    length: length
                )
            )
        case NBDMagic.simpleReply:
            guard let (_, error, cookie) = buffer.readMultipleIntegers(as: (UInt32, UInt32, UInt64).self) else { return nil }
            return .simple(SimpleReplyHeader(error: NBDErrno(rawValue: error), cookie: NBDCookie(cookie)))
        case NBDMagic.structuredReply:
            guard let (_, flags, type, cookie, length) = buffer.readMultipleIntegers(as: (UInt32, UInt16, UInt16, UInt64, UInt32).self)
            else { return nil }
            return .structured(
                StructuredReplyHeader(
                    flags: ReplyFlags(rawValue: flags),
                    type: ReplyChunkType(rawValue: type),
                    cookie: NBDCookie(cookie),
                    length: length
                )
            )
        default:
            throw .serverViolation("reply with unknown magic 0x\(String(magic, radix: 16))")
        }
    }

    /// Encodes the header (16 bytes simple, 20 bytes structured, 32 bytes extended).
    public func encode(into buffer: inout ByteBuffer) {
        switch self {
        case .extended(let header):
            buffer.writeMultipleIntegers(
                NBDMagic.extendedReply,
                header.flags.rawValue,
                header.type.rawValue,
                header.cookie.rawValue,
                header.offset,
                header.length
            )
        case .simple(let header):
            buffer.writeMultipleIntegers(NBDMagic.simpleReply, header.error.rawValue, header.cookie.rawValue)
        case .structured(let header):
            buffer.writeMultipleIntegers(
                NBDMagic.structuredReply,
                header.flags.rawValue,
                header.type.rawValue,
                header.cookie.rawValue,
                header.length
            )
        }
    }
}

/// A simple reply; a successful READ's data follows it.
@_spi(NBDMachines) public struct SimpleReplyHeader: Hashable, Sendable {
    /// Zero for success.
    public var error: NBDErrno
    /// The cookie of the request answered.
    public var cookie: NBDCookie
    /// A simple reply header; `error` 0 means success.
    public init(error: NBDErrno = NBDErrno(rawValue: 0), cookie: NBDCookie) {
        self.error = error
        self.cookie = cookie
    }
    /// Bytes on the wire.
    public static let size = 16
}

/// The header of one structured reply chunk; `length` bytes of payload follow.
@_spi(NBDMachines) public struct StructuredReplyHeader: Hashable, Sendable {
    /// Chunk flags (`NBD_REPLY_FLAG_DONE`).
    public var flags: ReplyFlags
    /// The chunk type.
    public var type: ReplyChunkType
    /// The cookie of the request answered.
    public var cookie: NBDCookie
    /// Length of the payload that follows.
    public var length: UInt32
    /// A chunk header with the given fields.
    public init(flags: ReplyFlags, type: ReplyChunkType, cookie: NBDCookie, length: UInt32) {
        self.flags = flags
        self.type = type
        self.cookie = cookie
        self.length = length
    }
    /// Bytes on the wire.
    public static let size = 20
}

/// The header of one extended reply chunk; `length` bytes of payload follow. Its `offset`
/// "MUST match the *offset* of the client's request".
@_spi(NBDMachines) public struct ExtendedReplyHeader: Hashable, Sendable {
    /// Chunk flags (`NBD_REPLY_FLAG_DONE`).
    public var flags: ReplyFlags
    /// The chunk type.
    public var type: ReplyChunkType
    /// The cookie of the request answered.
    public var cookie: NBDCookie
    /// The offset of the request answered.
    public var offset: UInt64
    /// Length of the payload that follows.
    public var length: UInt64
    /// A chunk header with the given fields.
    public init(flags: ReplyFlags, type: ReplyChunkType, cookie: NBDCookie, offset: UInt64, length: UInt64) {
        self.flags = flags
        self.type = type
        self.cookie = cookie
        self.offset = offset
        self.length = length
    }
    /// Bytes on the wire.
    public static let size = 32
}
