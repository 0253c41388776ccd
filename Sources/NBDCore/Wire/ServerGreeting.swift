import NIOCore

/// The first bytes a server sends ("Newstyle negotiation", "Oldstyle negotiation").
///
/// `NBDMAGIC`, then `IHAVEOPT` and 16 bits of handshake flags for newstyle servers, or
/// `cliserv_magic` for oldstyle ones (which this library recognises in order to refuse them
/// by name).
@_spi(NBDMachines) public enum ServerGreeting: Hashable, Sendable {
    /// A newstyle server and its handshake flags.
    case newstyle(HandshakeFlags)
    /// An oldstyle server: export size and flags follow (not read).
    case oldstyle

    /// Decodes a greeting; nil when more bytes are needed.
    /// Throws ``NBDError/Code-swift.struct/incompatibleServer`` when the peer is not NBD at all.
    public static func decode(from buffer: inout ByteBuffer) throws(NBDError) -> ServerGreeting? {
        try buffer.rewindingOnNil { (buffer) throws(NBDError) -> ServerGreeting? in
            guard let (password, magic) = buffer.readMultipleIntegers(as: (UInt64, UInt64).self) else { return nil }
            guard password == NBDMagic.initPassword else {
                throw NBDError(.incompatibleServer, "the peer is not an NBD server (no NBDMAGIC greeting)", connectionUsable: false)
            }
            switch magic {
            case NBDMagic.haveOption:
                guard let flags = buffer.readInteger(as: UInt16.self) else { return nil }
                return .newstyle(HandshakeFlags(rawValue: flags))
            case NBDMagic.oldstyle:
                return .oldstyle
            default:
                throw NBDError(.incompatibleServer, "unknown NBD greeting magic 0x\(String(magic, radix: 16))", connectionUsable: false)
            }
        }
    }

    /// Encodes a newstyle greeting (for servers and tests); oldstyle writes only the two magics.
    public func encode(into buffer: inout ByteBuffer) {
        switch self {
        case .newstyle(let flags):
            buffer.writeMultipleIntegers(NBDMagic.initPassword, NBDMagic.haveOption, flags.rawValue)
        case .oldstyle:
            buffer.writeMultipleIntegers(NBDMagic.initPassword, NBDMagic.oldstyle)
        }
    }
}
