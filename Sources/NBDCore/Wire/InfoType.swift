/// An `NBD_INFO_*` item asked for with `NBD_OPT_INFO` / `NBD_OPT_GO` ("`NBD_REP_INFO`").
public struct InfoType: WireCode {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    /// `NBD_INFO_EXPORT`: size and transmission flags (always sent on success).
    public static let export = InfoType(rawValue: 0)
    /// `NBD_INFO_NAME`: the canonical export name.
    public static let name = InfoType(rawValue: 1)
    /// `NBD_INFO_DESCRIPTION`: a human-readable description.
    public static let description = InfoType(rawValue: 2)
    /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
    public static let blockSize = InfoType(rawValue: 3)

    /// The spec's name of each value this library knows.
    public static let names: [UInt16: String] = [
        0: "NBD_INFO_EXPORT", 1: "NBD_INFO_NAME", 2: "NBD_INFO_DESCRIPTION", 3: "NBD_INFO_BLOCK_SIZE",
    ]
}
