import NIOCore

/// An option request of the negotiation phase ("Newstyle negotiation", "Option types"):
/// `IHAVEOPT`, 32 bits option, 32 bits length, data.
@_spi(NBDMachines) public enum OptionRequest: Hashable, Sendable {
    /// `NBD_OPT_EXPORT_NAME`: choose an export and enter transmission, with no error reporting.
    case exportName(String)
    /// `NBD_OPT_ABORT`: end the session softly.
    case abort
    /// `NBD_OPT_LIST`: list the exports.
    case list
    /// `NBD_OPT_STARTTLS`: upgrade the connection to TLS.
    case startTLS
    /// `NBD_OPT_INFO`: describe an export without entering transmission.
    case info(export: String, requests: [InfoType])
    /// `NBD_OPT_GO`: describe an export and enter transmission.
    case go(export: String, requests: [InfoType])
    /// `NBD_OPT_STRUCTURED_REPLY`.
    case structuredReply
    /// `NBD_OPT_LIST_META_CONTEXT`.
    case listMetaContext(export: String, queries: [String])
    /// `NBD_OPT_SET_META_CONTEXT`.
    case setMetaContext(export: String, queries: [String])
    /// `NBD_OPT_EXTENDED_HEADERS` (experimental).
    case extendedHeaders
    /// Any other option, with its raw data.
    case other(OptionCode, ByteBuffer)

    /// The option's code.
    public var code: OptionCode {
        switch self {
        case .exportName: .exportName
        case .abort: .abort
        case .list: .list
        case .startTLS: .startTLS
        case .info: .info
        case .go: .go
        case .structuredReply: .structuredReply
        case .listMetaContext: .listMetaContext
        case .setMetaContext: .setMetaContext
        case .extendedHeaders: .extendedHeaders
        case .other(let code, _): code
        }
    }

    /// Encodes the whole request, header and data.
    public func encode(into buffer: inout ByteBuffer) {
        buffer.writeInteger(NBDMagic.haveOption)
        buffer.writeInteger(code.rawValue)
        let lengthIndex = buffer.writerIndex
        buffer.writeInteger(UInt32(0))
        let start = buffer.writerIndex
        switch self {
        case .exportName(let name):
            buffer.writeString(name)
        case .abort, .list, .startTLS, .structuredReply, .extendedHeaders:
            break
        case .info(let export, let requests), .go(let export, let requests):
            buffer.writeLengthPrefixedString(export)
            buffer.writeInteger(UInt16(requests.count))
            for request in requests { buffer.writeInteger(request.rawValue) }
        case .listMetaContext(let export, let queries), .setMetaContext(let export, let queries):
            buffer.writeLengthPrefixedString(export)
            buffer.writeInteger(UInt32(queries.count))
            for query in queries { buffer.writeLengthPrefixedString(query) }
        case .other(_, var data):
            buffer.writeBuffer(&data)
        }
        buffer.setInteger(UInt32(buffer.writerIndex - start), at: lengthIndex)
    }

    /// Decodes a request (the server side); nil when more bytes are needed.
    /// A length over `maximumLength` is refused before its data is awaited.
    public static func decode(from buffer: inout ByteBuffer, maximumLength: Int = 64 * 1024) throws(NBDError) -> OptionRequest? {
        try buffer.rewindingOnNil { (buffer) throws(NBDError) -> OptionRequest? in
            guard let (magic, rawCode, length) = buffer.readMultipleIntegers(as: (UInt64, UInt32, UInt32).self) else { return nil }
            guard magic == NBDMagic.haveOption else { throw .clientViolation("option request without IHAVEOPT magic") }
            guard length <= maximumLength else { throw .clientViolation("option data of \(length) bytes exceeds \(maximumLength)") }
            guard var data = buffer.readSlice(length: Int(length)) else { return nil }
            let code = OptionCode(rawValue: rawCode)
            let request = try Self.parse(code: code, data: &data)
            guard data.readableBytes == 0 else { throw .clientViolation("\(code) carries \(data.readableBytes) unexpected bytes") }
            return request
        }
    }

    private static func parse(code: OptionCode, data: inout ByteBuffer) throws(NBDError) -> OptionRequest {
        let truncated = NBDError.clientViolation("\(code) data is truncated")
        switch code {
        case .exportName:
            return .exportName(data.readNBDString(length: data.readableBytes) ?? "")
        case .abort:
            data.moveReaderIndex(to: data.writerIndex)
            return .abort
        case .list: return .list
        case .startTLS: return .startTLS
        case .structuredReply: return .structuredReply
        case .extendedHeaders: return .extendedHeaders
        case .info, .go:
            guard let export = try data.readClientString(), let count = data.readInteger(as: UInt16.self) else { throw truncated }
            var requests: [InfoType] = []
            for _ in 0..<count {
                guard let raw = data.readInteger(as: UInt16.self) else { throw truncated }
                requests.append(InfoType(rawValue: raw))
            }
            return code == .info ? .info(export: export, requests: requests) : .go(export: export, requests: requests)
        case .listMetaContext, .setMetaContext:
            guard let export = try data.readClientString(), let count = data.readInteger(as: UInt32.self) else { throw truncated }
            var queries: [String] = []
            for _ in 0..<count {
                guard let query = try data.readClientString() else { throw truncated }
                queries.append(query)
            }
            return code == .listMetaContext
                ? .listMetaContext(export: export, queries: queries) : .setMetaContext(export: export, queries: queries)
        default:
            let rest = data.readSlice(length: data.readableBytes)!
            return .other(code, rest)
        }
    }
}
