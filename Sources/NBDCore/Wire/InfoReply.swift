import NIOCore

/// The payload of an `NBD_REP_INFO` reply: one `NBD_INFO_*` item ("`NBD_REP_INFO`").
@_spi(NBDMachines) public enum InfoReply: Hashable, Sendable {
    /// `NBD_INFO_EXPORT`: export size in bytes and transmission flags (length MUST be 12).
    case export(size: UInt64, flags: TransmissionFlags)
    /// `NBD_INFO_NAME`: the canonical name.
    case name(String)
    /// `NBD_INFO_DESCRIPTION`.
    case description(String)
    /// `NBD_INFO_BLOCK_SIZE` (length MUST be 14).
    case blockSize(BlockSizeConstraints)
    /// An item this library does not know; the spec says the client "MUST ignore" it.
    case unknown(InfoType)

    /// Decodes a whole payload (the reply's `length` bytes).
    public static func decode(payload: inout ByteBuffer) throws(NBDError) -> InfoReply {
        guard let raw = payload.readInteger(as: UInt16.self) else { throw .serverViolation("NBD_REP_INFO shorter than 2 bytes") }
        let type = InfoType(rawValue: raw)
        let rest = payload.readableBytes
        switch type {
        case .export:
            guard rest == 10, let (size, flags) = payload.readMultipleIntegers(as: (UInt64, UInt16).self) else {
                throw .serverViolation("NBD_INFO_EXPORT of length \(rest + 2), MUST be 12")
            }
            return .export(size: size, flags: TransmissionFlags(rawValue: flags))
        case .name, .description:
            guard rest <= nbdMaximumStringLength else { throw .serverViolation("\(type) of \(rest) bytes exceeds 4096") }
            let text = payload.readNBDString(length: rest)!
            return type == .name ? .name(text) : .description(text)
        case .blockSize:
            guard rest == 12, let (minimum, preferred, maximum) = payload.readMultipleIntegers(as: (UInt32, UInt32, UInt32).self) else {
                throw .serverViolation("NBD_INFO_BLOCK_SIZE of length \(rest + 2), MUST be 14")
            }
            return .blockSize(BlockSizeConstraints(minimum: minimum, preferred: preferred, maximum: maximum))
        default:
            payload.moveReaderIndex(forwardBy: rest)
            return .unknown(type)
        }
    }

    /// Encodes the payload (type and data), without the option reply header.
    public func encode(into buffer: inout ByteBuffer) {
        switch self {
        case .export(let size, let flags):
            buffer.writeMultipleIntegers(InfoType.export.rawValue, size, flags.rawValue)
        case .name(let name):
            buffer.writeInteger(InfoType.name.rawValue)
            buffer.writeString(name)
        case .description(let text):
            buffer.writeInteger(InfoType.description.rawValue)
            buffer.writeString(text)
        case .blockSize(let sizes):
            buffer.writeMultipleIntegers(InfoType.blockSize.rawValue, sizes.minimum, sizes.preferred, sizes.maximum)
        case .unknown(let type):
            buffer.writeInteger(type.rawValue)
        }
    }
}
