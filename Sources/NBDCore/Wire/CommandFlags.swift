/// Flags sent with every request ("Command flags").
public struct CommandFlags: OptionSet, Hashable, Sendable {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    /// `NBD_CMD_FLAG_FUA`: force unit access; needs `NBD_FLAG_SEND_FUA`.
    public static let fua = CommandFlags(rawValue: 1 << 0)
    /// `NBD_CMD_FLAG_NO_HOLE`: `NBD_CMD_WRITE_ZEROES` must not punch a hole.
    public static let noHole = CommandFlags(rawValue: 1 << 1)
    /// `NBD_CMD_FLAG_DF`: don't fragment a structured read reply; needs `NBD_FLAG_SEND_DF`.
    public static let dontFragment = CommandFlags(rawValue: 1 << 2)
    /// `NBD_CMD_FLAG_REQ_ONE`: one extent per context in a block status reply.
    public static let requestOne = CommandFlags(rawValue: 1 << 3)
    /// `NBD_CMD_FLAG_FAST_ZERO`: fail fast with `ENOTSUP` rather than zero slowly.
    public static let fastZero = CommandFlags(rawValue: 1 << 4)
    /// `NBD_CMD_FLAG_PAYLOAD_LEN` (experimental extended headers).
    public static let payloadLength = CommandFlags(rawValue: 1 << 5)
}
