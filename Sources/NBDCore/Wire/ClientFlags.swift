/// Client flags, the client's answer to the handshake flags ("Client flags").
@_spi(NBDMachines) public struct ClientFlags: OptionSet, Hashable, Sendable {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
    public static let fixedNewstyle = ClientFlags(rawValue: 1 << 0)
    /// `NBD_FLAG_C_NO_ZEROES`; the spec says it "MUST NOT be set if the server did not set
    /// `NBD_FLAG_NO_ZEROES`".
    public static let noZeroes = ClientFlags(rawValue: 1 << 1)
}
