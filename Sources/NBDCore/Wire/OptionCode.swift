/// An option the client sends in the negotiation phase ("Option types").
@_spi(NBDMachines) public struct OptionCode: WireCode {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// `NBD_OPT_EXPORT_NAME`
    public static let exportName = OptionCode(rawValue: 1)
    /// `NBD_OPT_ABORT`
    public static let abort = OptionCode(rawValue: 2)
    /// `NBD_OPT_LIST`
    public static let list = OptionCode(rawValue: 3)
    /// `NBD_OPT_PEEK_EXPORT`
    public static let peekExport = OptionCode(rawValue: 4)
    /// `NBD_OPT_STARTTLS`
    public static let startTLS = OptionCode(rawValue: 5)
    /// `NBD_OPT_INFO`
    public static let info = OptionCode(rawValue: 6)
    /// `NBD_OPT_GO`
    public static let go = OptionCode(rawValue: 7)
    /// `NBD_OPT_STRUCTURED_REPLY`
    public static let structuredReply = OptionCode(rawValue: 8)
    /// `NBD_OPT_LIST_META_CONTEXT`
    public static let listMetaContext = OptionCode(rawValue: 9)
    /// `NBD_OPT_SET_META_CONTEXT`
    public static let setMetaContext = OptionCode(rawValue: 10)
    /// `NBD_OPT_EXTENDED_HEADERS`
    public static let extendedHeaders = OptionCode(rawValue: 11)

    /// The spec's name of each value this library knows.
    public static let names: [UInt32: String] = [
        1: "NBD_OPT_EXPORT_NAME", 2: "NBD_OPT_ABORT", 3: "NBD_OPT_LIST", 4: "NBD_OPT_PEEK_EXPORT",
        5: "NBD_OPT_STARTTLS", 6: "NBD_OPT_INFO", 7: "NBD_OPT_GO", 8: "NBD_OPT_STRUCTURED_REPLY",
        9: "NBD_OPT_LIST_META_CONTEXT", 10: "NBD_OPT_SET_META_CONTEXT", 11: "NBD_OPT_EXTENDED_HEADERS",
    ]
}
