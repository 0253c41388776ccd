import NIOCore

/// The server's answer to `NBD_OPT_EXPORT_NAME` ("Newstyle negotiation"): 64 bits size,
/// 16 bits transmission flags, then 124 zero bytes unless `NBD_FLAG_C_NO_ZEROES` was agreed.
package struct ExportNameReply: Hashable, Sendable {
    /// Export size in bytes.
    package var size: UInt64
    /// Transmission flags.
    package var flags: TransmissionFlags

    /// A reply with the given size and flags.
    package init(size: UInt64, flags: TransmissionFlags) {
        self.size = size
        self.flags = flags
    }

    static let zeroes = 124

    /// Decodes the reply; nil when more bytes are needed.
    package static func decode(from buffer: inout ByteBuffer, noZeroes: Bool) -> ExportNameReply? {
        let needed = 10 + (noZeroes ? 0 : zeroes)
        guard buffer.readableBytes >= needed, let (size, flags) = buffer.readMultipleIntegers(as: (UInt64, UInt16).self) else { return nil }
        buffer.moveReaderIndex(forwardBy: needed - 10)
        return ExportNameReply(size: size, flags: TransmissionFlags(rawValue: flags))
    }

    /// Encodes the reply, with the 124 zero bytes unless `noZeroes`.
    package func encode(into buffer: inout ByteBuffer, noZeroes: Bool) {
        buffer.writeMultipleIntegers(size, flags.rawValue)
        if !noZeroes { buffer.writeRepeatingByte(0, count: Self.zeroes) }
    }
}
