/// The type of a structured reply chunk ("Structured reply types").
/// Error chunks have bit 15 set.
@_spi(NBDMachines) public struct ReplyChunkType: WireCode {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    /// `NBD_REPLY_TYPE_NONE`
    public static let none = ReplyChunkType(rawValue: 0)
    /// `NBD_REPLY_TYPE_OFFSET_DATA`
    public static let offsetData = ReplyChunkType(rawValue: 1)
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`
    public static let offsetHole = ReplyChunkType(rawValue: 2)
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`
    public static let blockStatus = ReplyChunkType(rawValue: 5)
    /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`
    public static let blockStatusExtended = ReplyChunkType(rawValue: 6)
    /// `NBD_REPLY_TYPE_ERROR`
    public static let error = ReplyChunkType(rawValue: 1 << 15 | 1)
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`
    public static let errorOffset = ReplyChunkType(rawValue: 1 << 15 | 2)

    /// True for every error chunk type, known or not.
    public var isError: Bool { rawValue & (1 << 15) != 0 }

    /// The spec's name of each value this library knows.
    public static let names: [UInt16: String] = [
        0: "NBD_REPLY_TYPE_NONE", 1: "NBD_REPLY_TYPE_OFFSET_DATA", 2: "NBD_REPLY_TYPE_OFFSET_HOLE",
        5: "NBD_REPLY_TYPE_BLOCK_STATUS", 6: "NBD_REPLY_TYPE_BLOCK_STATUS_EXT",
        1 << 15 | 1: "NBD_REPLY_TYPE_ERROR", 1 << 15 | 2: "NBD_REPLY_TYPE_ERROR_OFFSET",
    ]
}
