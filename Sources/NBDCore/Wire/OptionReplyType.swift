/// The type of an option reply ("Option reply types"). Error replies have bit 31 set.
public struct OptionReplyType: WireCode {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// `NBD_REP_ACK`
    public static let ack = OptionReplyType(rawValue: 1)
    /// `NBD_REP_SERVER`
    public static let server = OptionReplyType(rawValue: 2)
    /// `NBD_REP_INFO`
    public static let info = OptionReplyType(rawValue: 3)
    /// `NBD_REP_META_CONTEXT`
    public static let metaContext = OptionReplyType(rawValue: 4)

    static let errorBit: UInt32 = 1 << 31
    /// `NBD_REP_ERR_UNSUP`
    public static let errUnsupported = OptionReplyType(rawValue: errorBit | 1)
    /// `NBD_REP_ERR_POLICY`
    public static let errPolicy = OptionReplyType(rawValue: errorBit | 2)
    /// `NBD_REP_ERR_INVALID`
    public static let errInvalid = OptionReplyType(rawValue: errorBit | 3)
    /// `NBD_REP_ERR_PLATFORM`
    public static let errPlatform = OptionReplyType(rawValue: errorBit | 4)
    /// `NBD_REP_ERR_TLS_REQD`
    public static let errTLSRequired = OptionReplyType(rawValue: errorBit | 5)
    /// `NBD_REP_ERR_UNKNOWN`
    public static let errUnknown = OptionReplyType(rawValue: errorBit | 6)
    /// `NBD_REP_ERR_SHUTDOWN`
    public static let errShutdown = OptionReplyType(rawValue: errorBit | 7)
    /// `NBD_REP_ERR_BLOCK_SIZE_REQD`
    public static let errBlockSizeRequired = OptionReplyType(rawValue: errorBit | 8)
    /// `NBD_REP_ERR_TOO_BIG`
    public static let errTooBig = OptionReplyType(rawValue: errorBit | 9)
    /// `NBD_REP_ERR_EXT_HEADER_REQD`
    public static let errExtendedHeaderRequired = OptionReplyType(rawValue: errorBit | 10)

    /// True for every `NBD_REP_ERR_*`, known or not.
    public var isError: Bool { rawValue & Self.errorBit != 0 }

    /// The spec's name of each value this library knows.
    public static let names: [UInt32: String] = [
        1: "NBD_REP_ACK", 2: "NBD_REP_SERVER", 3: "NBD_REP_INFO", 4: "NBD_REP_META_CONTEXT",
        errorBit | 1: "NBD_REP_ERR_UNSUP", errorBit | 2: "NBD_REP_ERR_POLICY",
        errorBit | 3: "NBD_REP_ERR_INVALID", errorBit | 4: "NBD_REP_ERR_PLATFORM",
        errorBit | 5: "NBD_REP_ERR_TLS_REQD", errorBit | 6: "NBD_REP_ERR_UNKNOWN",
        errorBit | 7: "NBD_REP_ERR_SHUTDOWN", errorBit | 8: "NBD_REP_ERR_BLOCK_SIZE_REQD",
        errorBit | 9: "NBD_REP_ERR_TOO_BIG", errorBit | 10: "NBD_REP_ERR_EXT_HEADER_REQD",
    ]
}
