import NIOCore

/// The server's answer to `NBD_OPT_EXPORT_NAME` ("Newstyle negotiation"): 64 bits size,
/// 16 bits transmission flags, then 124 zero bytes unless `NBD_FLAG_C_NO_ZEROES` was agreed.
@_spi(NBDMachines) public struct ExportNameReply: Hashable, Sendable {
    /// Export size in bytes.
    public var size: UInt64
    /// Transmission flags.
    public var flags: TransmissionFlags

    /// A reply with the given size and flags.
    public init(size: UInt64, flags: TransmissionFlags) {
        self.size = size
        self.flags = flags
    }

    static let zeroes = 124

    /// Decodes the reply; nil when more bytes are needed.
    public static func decode(from buffer: inout ByteBuffer, noZeroes: Bool) -> ExportNameReply? {
        let needed = 10 + (noZeroes ? 0 : zeroes)
        guard buffer.readableBytes >= needed, let (size, flags) = buffer.readMultipleIntegers(as: (UInt64, UInt16).self) else { return nil }
        buffer.moveReaderIndex(forwardBy: needed - 10)
        return ExportNameReply(size: size, flags: TransmissionFlags(rawValue: flags))
    }

    /// Encodes the reply, with the 124 zero bytes unless `noZeroes`.
    public func encode(into buffer: inout ByteBuffer, noZeroes: Bool) {
        buffer.writeMultipleIntegers(size, flags.rawValue)
        if !noZeroes { buffer.writeRepeatingByte(0, count: Self.zeroes) }
    }
}
