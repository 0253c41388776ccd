extension CommandType {
    /// The command flags the spec documents for this command ("Command flags"), or nil for a
    /// command that is no request a client may send here. The one table of the library: the
    /// client's strict mode and the server's checks both read it.
    ///
    /// "NBD_CMD_FLAG_FUA; This flag is valid for all commands, provided NBD_FLAG_SEND_FUA has
    /// been negotiated, in which case the server MUST accept all commands with this bit set."
    public var documentedFlags: CommandFlags? {
        switch self {
        case .read: [.fua, .dontFragment]
        case .write, .flush, .trim, .cache: [.fua]
        case .writeZeroes: [.fua, .noHole, .fastZero]
        case .blockStatus: [.fua, .requestOne]
        // The RESIZE extension documents no flag of its own; FUA is valid for all commands.
        case .resize: [.fua]
        default: nil
        }
    }

    /// Whether the command may write data: "The client SHOULD NOT set [FUA] unless the command
    /// has the potential of writing data (current commands are NBD_CMD_WRITE,
    /// NBD_CMD_WRITE_ZEROES and NBD_CMD_TRIM)".
    public var writesData: Bool { self == .write || self == .writeZeroes || self == .trim }

    /// Whether the command changes the export, and so is refused on a read-only one.
    public var modifiesExport: Bool { writesData || self == .resize }
}
