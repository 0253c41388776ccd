import NIOCore

/// One option reply ("Fixed newstyle negotiation", "Option reply types"):
/// magic, 32 bits option, 32 bits reply type, 32 bits length, data.
@_spi(NBDMachines) public struct OptionReply: Hashable, Sendable {
    /// The option this replies to; the spec says it is "the option as sent by the client".
    public var option: OptionCode
    /// The decoded reply.
    public var body: Body

    /// What a reply says, by reply type.
    public enum Body: Hashable, Sendable {
        /// `NBD_REP_ACK`.
        case ack
        /// `NBD_REP_SERVER`: one export of a list, with its description (may be empty).
        case server(name: String, description: String)
        /// `NBD_REP_INFO`: one item about an export.
        case info(InfoReply)
        /// `NBD_REP_META_CONTEXT`: a context and the id the server gave it.
        case metaContext(id: UInt32, name: String)
        /// `NBD_REP_ERR_*`, with the server's message (may be empty).
        case error(OptionReplyType, message: String)
    }

    /// A reply to `option`.
    public init(option: OptionCode, body: Body) {
        self.option = option
        self.body = body
    }

    /// The reply type on the wire.
    public var type: OptionReplyType {
        switch body {
        case .ack: .ack
        case .server: .server
        case .info: .info
        case .metaContext: .metaContext
        case .error(let type, _): type
        }
    }

    /// Largest reply this library reads by default: a SERVER reply of two maximal strings.
    public static let defaultMaximumLength = 4 + 2 * nbdMaximumStringLength

    /// Decodes one reply; nil when more bytes are needed. A length over `maximumLength` is
    /// refused as soon as the header is read, before its data is awaited or allocated.
    public static func decode(from buffer: inout ByteBuffer, maximumLength: Int = defaultMaximumLength) throws(NBDError) -> OptionReply? {
        try buffer.rewindingOnNil { (buffer) throws(NBDError) -> OptionReply? in
            guard let (magic, rawOption, rawType, length) = buffer.readMultipleIntegers(as: (UInt64, UInt32, UInt32, UInt32).self) else {
                return nil
            }
            guard magic == NBDMagic.optionReply else { throw .serverViolation("option reply with bad magic 0x\(String(magic, radix: 16))") }
            guard length <= maximumLength else {
                throw .serverViolation("option reply of \(length) bytes exceeds the bound of \(maximumLength)")
            }
            guard var payload = buffer.readSlice(length: Int(length)) else { return nil }
            let type = OptionReplyType(rawValue: rawType)
            let body = try Self.parse(type: type, payload: &payload)
            return OptionReply(option: OptionCode(rawValue: rawOption), body: body)
        }
    }

    private static func parse(type: OptionReplyType, payload: inout ByteBuffer) throws(NBDError) -> Body {
        let length = payload.readableBytes
        switch type {
        case .ack:
            guard length == 0 else { throw .serverViolation("NBD_REP_ACK with \(length) bytes of data") }
            return .ack
        case .server:
            guard let nameLength = payload.readInteger(as: UInt32.self), nameLength <= payload.readableBytes else {
                throw .serverViolation("NBD_REP_SERVER name length exceeds the reply")
            }
            let name = payload.readNBDString(length: Int(nameLength))!
            return .server(name: name, description: payload.readNBDString(length: payload.readableBytes)!)
        case .info:
            return .info(try InfoReply.decode(payload: &payload))
        case .metaContext:
            guard let id = payload.readInteger(as: UInt32.self) else { throw .serverViolation("NBD_REP_META_CONTEXT shorter than 4 bytes") }
            return .metaContext(id: id, name: payload.readNBDString(length: payload.readableBytes)!)
        default:
            guard type.isError else { throw .serverViolation("unknown option reply type \(type.rawValue)") }
            return .error(type, message: payload.readNBDString(length: length)!)
        }
    }

    /// Encodes the whole reply (for servers and tests).
    public func encode(into buffer: inout ByteBuffer) {
        buffer.writeMultipleIntegers(NBDMagic.optionReply, option.rawValue, type.rawValue, UInt32(0))
        let lengthIndex = buffer.writerIndex - 4
        let start = buffer.writerIndex
        switch body {
        case .ack: break
        case .server(let name, let description):
            buffer.writeLengthPrefixedString(name)
            buffer.writeString(description)
        case .info(let info): info.encode(into: &buffer)
        case .metaContext(let id, let name):
            buffer.writeInteger(id)
            buffer.writeString(name)
        case .error(_, let message): buffer.writeString(message)
        }
        buffer.setInteger(UInt32(buffer.writerIndex - start), at: lengthIndex)
    }
}
