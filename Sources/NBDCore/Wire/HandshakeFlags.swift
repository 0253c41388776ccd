/// Handshake flags, sent by the server after `IHAVEOPT` ("Handshake flags").
public struct HandshakeFlags: OptionSet, Hashable, Sendable {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    /// `NBD_FLAG_FIXED_NEWSTYLE`: the server speaks fixed newstyle negotiation.
    public static let fixedNewstyle = HandshakeFlags(rawValue: 1 << 0)
    /// `NBD_FLAG_NO_ZEROES`: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    public static let noZeroes = HandshakeFlags(rawValue: 1 << 1)
}
