/// The magic numbers that frame every NBD message ("Protocol phases", "Transmission").
@_spi(NBDMachines) public enum NBDMagic {
    /// `NBDMAGIC`, the first 8 bytes a server sends (also `INIT_PASSWD`).
    public static let initPassword: UInt64 = 0x4e42_444d_4147_4943
    /// `IHAVEOPT`: newstyle greeting, and the prefix of every option request.
    public static let haveOption: UInt64 = 0x4948_4156_454F_5054
    /// `cliserv_magic`: the greeting of an oldstyle server.
    public static let oldstyle: UInt64 = 0x0042_0281_8612_53
    /// Prefix of every option reply in fixed newstyle negotiation.
    public static let optionReply: UInt64 = 0x3_e889_0455_65a9
    /// `NBD_REQUEST_MAGIC`.
    public static let request: UInt32 = 0x2560_9513
    /// `NBD_SIMPLE_REPLY_MAGIC`.
    public static let simpleReply: UInt32 = 0x6744_6698
    /// `NBD_STRUCTURED_REPLY_MAGIC`.
    public static let structuredReply: UInt32 = 0x668e_33ef
    /// `NBD_EXTENDED_REQUEST_MAGIC`: a 32-byte request, once extended headers are negotiated.
    public static let extendedRequest: UInt32 = 0x21e4_1c71
    /// `NBD_EXTENDED_REPLY_MAGIC`: a 32-byte reply chunk header, once extended headers are negotiated.
    public static let extendedReply: UInt32 = 0x6e8a_278c
}
