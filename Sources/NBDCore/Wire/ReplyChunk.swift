import NIOCore

/// The payload of a structured reply chunk other than the data of `NBD_REPLY_TYPE_OFFSET_DATA`
/// ("Structured reply types"). OFFSET_DATA's data is streamed, not decoded here.
@_spi(NBDMachines) public enum ReplyChunk: Hashable, Sendable {
    /// `NBD_REPLY_TYPE_NONE`: length MUST be 0.
    case none
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`: `length` bytes at `offset` read as zeroes (length MUST be 12).
    case offsetHole(offset: UInt64, length: UInt32)
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`: a context id and at least one descriptor of 32-bit
    /// length and flags.
    case blockStatus(contextID: UInt32, descriptors: [BlockDescriptor])
    /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`: a context id, a descriptor count, and that many
    /// descriptors of 64-bit length and flags.
    case blockStatusExtended(contextID: UInt32, descriptors: [BlockDescriptor])
    /// `NBD_REPLY_TYPE_ERROR` / `_ERROR_OFFSET` or an unknown error type: 32 bits error,
    /// 16 bits message length, message, then (ERROR_OFFSET) 64 bits offset.
    case error(ReplyChunkType, errno: NBDErrno, message: String, offset: UInt64?)

    /// Decodes a complete payload of a chunk of type `type`.
    public static func decode(type: ReplyChunkType, payload: inout ByteBuffer) throws(NBDError) -> ReplyChunk {
        let length = payload.readableBytes
        switch type {
        case .none:
            guard length == 0 else { throw .serverViolation("NBD_REPLY_TYPE_NONE with length \(length), MUST be 0") }
            return .none
        case .offsetHole:
            guard length == 12, let (offset, holeLength) = payload.readMultipleIntegers(as: (UInt64, UInt32).self) else {
                throw .serverViolation("NBD_REPLY_TYPE_OFFSET_HOLE with length \(length), MUST be 12")
            }
            guard holeLength > 0 else { throw .serverViolation("NBD_REPLY_TYPE_OFFSET_HOLE of size 0") }
            return .offsetHole(offset: offset, length: holeLength)
        case .blockStatus:
            guard length >= 12, (length - 4) % 8 == 0, let contextID = payload.readInteger(as: UInt32.self) else {
                throw .serverViolation("NBD_REPLY_TYPE_BLOCK_STATUS with length \(length), MUST be 4 + a positive multiple of 8")
            }
            var descriptors: [BlockDescriptor] = []
            descriptors.reserveCapacity((length - 4) / 8)
            while let (extentLength, flags) = payload.readMultipleIntegers(as: (UInt32, UInt32).self) {
                guard extentLength > 0 else { throw .serverViolation("block status descriptor of length 0") }
                descriptors.append(BlockDescriptor(length: UInt64(extentLength), flags: UInt64(flags)))
            }
            return .blockStatus(contextID: contextID, descriptors: descriptors)
        case .blockStatusExtended:
            // "*length* MUST be 8 + (a positive multiple of 16)", and "The *descriptor count*
            // field MUST correspond to the number of subsequent descriptors".
            guard length >= 24, (length - 8) % 16 == 0, let (contextID, count) = payload.readMultipleIntegers(as: (UInt32, UInt32).self)
            else {
                throw .serverViolation("NBD_REPLY_TYPE_BLOCK_STATUS_EXT with length \(length), MUST be 8 + a positive multiple of 16")
            }
            guard Int(count) == (length - 8) / 16 else {
                throw .serverViolation(
                    "NBD_REPLY_TYPE_BLOCK_STATUS_EXT counts \(count) descriptors in a chunk that holds \((length - 8) / 16)"
                )
            }
            var descriptors: [BlockDescriptor] = []
            descriptors.reserveCapacity(Int(count))
            while let (extentLength, flags) = payload.readMultipleIntegers(as: (UInt64, UInt64).self) {
                guard extentLength > 0 else { throw .serverViolation("block status descriptor of length 0") }
                descriptors.append(BlockDescriptor(length: extentLength, flags: flags))
            }
            return .blockStatusExtended(contextID: contextID, descriptors: descriptors)
        default:
            guard type.isError else { throw .serverViolation("unknown structured reply type \(type.rawValue)") }
            let fixed = type == .errorOffset ? 14 : 6
            guard length >= fixed, let (errno, messageLength) = payload.readMultipleIntegers(as: (UInt32, UInt16).self) else {
                throw .serverViolation("\(type) with length \(length), MUST be at least \(fixed)")
            }
            guard Int(messageLength) <= length - fixed else {
                throw .serverViolation("\(type) message length \(messageLength) does not fit in the chunk")
            }
            guard messageLength <= nbdMaximumStringLength else { throw .serverViolation("\(type) message exceeds 4096 bytes") }
            guard errno != 0 else { throw .serverViolation("\(type) with error value 0, MUST be nonzero") }
            let message = payload.readNBDString(length: Int(messageLength))!
            var offset: UInt64?
            if type == .errorOffset {
                guard payload.readableBytes == 8 else { throw .serverViolation("NBD_REPLY_TYPE_ERROR_OFFSET has trailing bytes") }
                offset = payload.readInteger(as: UInt64.self)
            }
            return .error(type, errno: NBDErrno(rawValue: errno), message: message, offset: offset)
        }
    }

    /// Encodes the payload only (for servers and tests).
    public func encode(into buffer: inout ByteBuffer) {
        switch self {
        case .none: break
        case .offsetHole(let offset, let length): buffer.writeMultipleIntegers(offset, length)
        case .blockStatus(let contextID, let descriptors):
            buffer.writeInteger(contextID)
            for descriptor in descriptors {
                precondition(descriptor.length <= UInt32.max && descriptor.flags <= UInt32.max, "a 32-bit block status descriptor")
                buffer.writeMultipleIntegers(UInt32(descriptor.length), UInt32(descriptor.flags))
            }
        case .blockStatusExtended(let contextID, let descriptors):
            buffer.writeMultipleIntegers(contextID, UInt32(descriptors.count))
            for descriptor in descriptors { buffer.writeMultipleIntegers(descriptor.length, descriptor.flags) }
        case .error(_, let errno, let message, let offset):
            buffer.writeMultipleIntegers(errno.rawValue, UInt16(message.utf8.count))
            buffer.writeString(message)
            if let offset { buffer.writeInteger(offset) }
        }
    }
}
