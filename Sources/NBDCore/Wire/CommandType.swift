/// The type of a transmission-phase request ("Request types").
package struct CommandType: WireCode {
    package var rawValue: UInt16
    package init(rawValue: UInt16) { self.rawValue = rawValue }

    /// `NBD_CMD_READ`
    package static let read = CommandType(rawValue: 0)
    /// `NBD_CMD_WRITE`
    package static let write = CommandType(rawValue: 1)
    /// `NBD_CMD_DISC`
    package static let disconnect = CommandType(rawValue: 2)
    /// `NBD_CMD_FLUSH`
    package static let flush = CommandType(rawValue: 3)
    /// `NBD_CMD_TRIM`
    package static let trim = CommandType(rawValue: 4)
    /// `NBD_CMD_CACHE`
    package static let cache = CommandType(rawValue: 5)
    /// `NBD_CMD_WRITE_ZEROES`
    package static let writeZeroes = CommandType(rawValue: 6)
    /// `NBD_CMD_BLOCK_STATUS`
    package static let blockStatus = CommandType(rawValue: 7)
    /// `NBD_CMD_RESIZE`
    package static let resize = CommandType(rawValue: 8)

    /// The spec's name of each value this library knows.
    package static let names: [UInt16: String] = [
        0: "NBD_CMD_READ", 1: "NBD_CMD_WRITE", 2: "NBD_CMD_DISC", 3: "NBD_CMD_FLUSH",
        4: "NBD_CMD_TRIM", 5: "NBD_CMD_CACHE", 6: "NBD_CMD_WRITE_ZEROES",
        7: "NBD_CMD_BLOCK_STATUS", 8: "NBD_CMD_RESIZE",
    ]
}
