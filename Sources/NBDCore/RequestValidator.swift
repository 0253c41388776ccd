/// libnbd's "strict mode": the checks a request passes before anything reaches the wire.
///
/// The spec puts these duties on the client: "The client MUST NOT use a feature documented as
/// 'exposed' by a flag unless that flag was set", "Clients MUST NOT set a command flag bit that
/// is not documented for the particular command", "the client MUST ensure that offset and length
/// are integer multiples of any advertised minimum block size" and "MUST NOT use a length which,
/// when added to offset, would exceed the export size".
@_spi(NBDMachines) public struct RequestValidator: Sendable {
    /// The export requests go to.
    public var export: NBDExportInfo
    /// How transmission is framed.
    public var format: TransmissionFormat
    /// Whether replies come as chunks (structured or extended).
    public var structuredReplies: Bool { format.hasChunks }
    /// Whether at least one metadata context was selected for this export.
    public var hasMetaContexts: Bool

    /// A validator for `export` with what was negotiated.
    public init(export: NBDExportInfo, format: TransmissionFormat, hasMetaContexts: Bool) {
        self.export = export
        self.format = format
        self.hasMetaContexts = hasMetaContexts
    }

    /// Throws an ``NBDError`` with code `invalidArgument` or `notAdvertised` when the
    /// request must not be sent. `length` is the whole range, before any splitting.
    /// `NBD_CMD_FLAG_PAYLOAD_LEN` is not the caller's: the client sets it where the format
    /// wants it, and it is refused here with the other undocumented flags. `onlyContexts`, for a
    /// BLOCK_STATUS, are the ids of the payload form, which needs extended headers and
    /// `NBD_FLAG_BLOCK_STATUS_PAYLOAD`.
    public func validate(
        _ command: CommandType,
        flags: CommandFlags,
        offset: UInt64,
        length: UInt64,
        onlyContexts: [UInt32]? = nil
    ) throws(NBDError) {
        if let onlyContexts {
            guard command == .blockStatus, format == .extended, export.canBlockStatusPayload else {
                throw .unsupported("block status for some contexts only needs extended headers and NBD_FLAG_BLOCK_STATUS_PAYLOAD")
            }
            guard !onlyContexts.isEmpty else { throw .invalidArgument("block status for no metadata context") }
        }
        switch command {
        case .read:
            break
        case .write:
            break
        case .flush:
            try require(.sendFlush, "NBD_FLAG_SEND_FLUSH", for: command)
        case .trim:
            try require(.sendTrim, "NBD_FLAG_SEND_TRIM", for: command)
        case .cache:
            try require(.sendCache, "NBD_FLAG_SEND_CACHE", for: command)
        case .writeZeroes:
            try require(.sendWriteZeroes, "NBD_FLAG_SEND_WRITE_ZEROES", for: command)
        case .blockStatus:
            guard structuredReplies, hasMetaContexts else {
                throw .unsupported(
                    "NBD_CMD_BLOCK_STATUS needs structured replies and at least one metadata context selected with NBD_OPT_SET_META_CONTEXT"
                )
            }
        default:
            throw .invalidArgument("\(command) cannot be sent as a request here")
        }
        if command.modifiesExport, export.isReadOnly { throw .unsupported("\(command) on a read-only export") }
        // The spec's table of flags, less FUA where it means nothing: "The client SHOULD NOT
        // set this bit unless the command has the potential of writing data".
        var allowed = command.documentedFlags ?? []
        if !command.writesData { allowed.remove(.fua) }
        let extra = flags.subtracting(allowed)
        guard extra.isEmpty else {
            throw .invalidArgument("flags 0x\(String(extra.rawValue, radix: 16)) are not valid for \(command)")
        }
        if flags.contains(.fua) { try require(.sendFUA, "NBD_FLAG_SEND_FUA", for: "NBD_CMD_FLAG_FUA") }
        if flags.contains(.fastZero) { try require(.sendFastZero, "NBD_FLAG_SEND_FAST_ZERO", for: "NBD_CMD_FLAG_FAST_ZERO") }
        if flags.contains(.dontFragment) {
            guard structuredReplies else { throw .unsupported("NBD_CMD_FLAG_DF needs structured replies") }
            try require(.sendDF, "NBD_FLAG_SEND_DF", for: "NBD_CMD_FLAG_DF")
        }
        guard command != .flush else {
            guard offset == 0, length == 0 else { throw .invalidArgument("NBD_CMD_FLUSH takes no offset or length") }
            return
        }
        guard length > 0 else { throw .invalidArgument("\(command) of length 0") }
        let (end, overflow) = offset.addingReportingOverflow(length)
        guard !overflow, end <= export.size else {
            throw .invalidArgument(
                "\(command) of \(length) bytes at offset \(offset) runs past the end of the export (\(export.size) bytes)"
            )
        }
        let minimum = UInt64(export.blockSizes.minimum)
        guard offset % minimum == 0, length % minimum == 0 || end == export.size else {
            throw .invalidArgument("\(command) at offset \(offset) length \(length) is not aligned to the minimum block size \(minimum)")
        }
    }

    /// Throws an ``NBDError`` when `NBD_CMD_RESIZE` to `size` must not be sent: "Clients MUST
    /// NOT send a resize request unless the NBD_FLAG_SEND_RESIZE flag was set", a read-only
    /// export, a size no offset can hold, or one that is not a multiple of the minimum block
    /// size (which every request's offset and length must be).
    public func validateResize(to size: UInt64) throws(NBDError) {
        try require(.sendResize, "NBD_FLAG_SEND_RESIZE", for: CommandType.resize)
        if export.isReadOnly { throw .unsupported("\(CommandType.resize) on a read-only export") }
        guard size <= UInt64(Int64.max) else { throw .invalidArgument("a size of \(size) bytes is too large") }
        let minimum = UInt64(export.blockSizes.minimum)
        guard size % minimum == 0 else {
            throw .invalidArgument("a size of \(size) bytes is not a multiple of the minimum block size \(minimum)")
        }
    }

    private func require(_ flag: TransmissionFlags, _ name: String, for what: CustomStringConvertible) throws(NBDError) {
        guard export.flags.contains(flag) else { throw .unsupported("\(what) is not supported by this export (no \(name))") }
    }
}
