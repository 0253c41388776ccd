/// Transmission flags: what an export supports ("Transmission flags").
public struct TransmissionFlags: OptionSet, Hashable, Sendable {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    /// `NBD_FLAG_HAS_FLAGS`: always set by a conforming server.
    public static let hasFlags = TransmissionFlags(rawValue: 1 << 0)
    /// `NBD_FLAG_READ_ONLY`.
    public static let readOnly = TransmissionFlags(rawValue: 1 << 1)
    /// `NBD_FLAG_SEND_FLUSH`: `NBD_CMD_FLUSH` is supported.
    public static let sendFlush = TransmissionFlags(rawValue: 1 << 2)
    /// `NBD_FLAG_SEND_FUA`: `NBD_CMD_FLAG_FUA` is supported.
    public static let sendFUA = TransmissionFlags(rawValue: 1 << 3)
    /// `NBD_FLAG_ROTATIONAL`.
    public static let rotational = TransmissionFlags(rawValue: 1 << 4)
    /// `NBD_FLAG_SEND_TRIM`: `NBD_CMD_TRIM` is supported.
    public static let sendTrim = TransmissionFlags(rawValue: 1 << 5)
    /// `NBD_FLAG_SEND_WRITE_ZEROES`: `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_FLAG_NO_HOLE` are supported.
    public static let sendWriteZeroes = TransmissionFlags(rawValue: 1 << 6)
    /// `NBD_FLAG_SEND_DF`: `NBD_CMD_FLAG_DF` is supported on reads.
    public static let sendDF = TransmissionFlags(rawValue: 1 << 7)
    /// `NBD_FLAG_CAN_MULTI_CONN`: flushes are visible across connections.
    public static let canMultiConn = TransmissionFlags(rawValue: 1 << 8)
    /// `NBD_FLAG_SEND_RESIZE` (experimental RESIZE extension).
    public static let sendResize = TransmissionFlags(rawValue: 1 << 9)
    /// `NBD_FLAG_SEND_CACHE`: `NBD_CMD_CACHE` is supported.
    public static let sendCache = TransmissionFlags(rawValue: 1 << 10)
    /// `NBD_FLAG_SEND_FAST_ZERO`: `NBD_CMD_FLAG_FAST_ZERO` is supported.
    public static let sendFastZero = TransmissionFlags(rawValue: 1 << 11)
    /// `NBD_FLAG_BLOCK_STATUS_PAYLOAD` (experimental extended headers).
    public static let blockStatusPayload = TransmissionFlags(rawValue: 1 << 12)
}
