/// The type of a transmission-phase request ("Request types").
@_spi(NBDMachines) public struct CommandType: WireCode {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    /// `NBD_CMD_READ`
    public static let read = CommandType(rawValue: 0)
    /// `NBD_CMD_WRITE`
    public static let write = CommandType(rawValue: 1)
    /// `NBD_CMD_DISC`
    public static let disconnect = CommandType(rawValue: 2)
    /// `NBD_CMD_FLUSH`
    public static let flush = CommandType(rawValue: 3)
    /// `NBD_CMD_TRIM`
    public static let trim = CommandType(rawValue: 4)
    /// `NBD_CMD_CACHE`
    public static let cache = CommandType(rawValue: 5)
    /// `NBD_CMD_WRITE_ZEROES`
    public static let writeZeroes = CommandType(rawValue: 6)
    /// `NBD_CMD_BLOCK_STATUS`
    public static let blockStatus = CommandType(rawValue: 7)
    /// `NBD_CMD_RESIZE`
    public static let resize = CommandType(rawValue: 8)

    /// The spec's name of each value this library knows.
    public static let names: [UInt16: String] = [
        0: "NBD_CMD_READ", 1: "NBD_CMD_WRITE", 2: "NBD_CMD_DISC", 3: "NBD_CMD_FLUSH",
        4: "NBD_CMD_TRIM", 5: "NBD_CMD_CACHE", 6: "NBD_CMD_WRITE_ZEROES",
        7: "NBD_CMD_BLOCK_STATUS", 8: "NBD_CMD_RESIZE",
    ]
}
