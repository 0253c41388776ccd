/// What a server says about an export: the answer to `NBD_OPT_INFO` / `NBD_OPT_GO`
/// (or `NBD_OPT_EXPORT_NAME`, which gives only size and flags).
public struct NBDExportInfo: Hashable, Sendable {
    /// The export's name: the server's canonical one (`NBD_INFO_NAME`) when it sent it,
    /// otherwise the name asked for.
    public var name: String
    /// The human-readable description (`NBD_INFO_DESCRIPTION`), when the server sent one.
    public var description: String?
    /// Size in bytes.
    public var size: UInt64
    /// Transmission flags: what the export supports.
    public var flags: TransmissionFlags
    /// Size constraints, when the server advertised them (`NBD_INFO_BLOCK_SIZE`).
    public var advertisedBlockSizes: BlockSizeConstraints?

    /// A description with the given fields.
    public init(
        name: String,
        description: String? = nil,
        size: UInt64,
        flags: TransmissionFlags,
        advertisedBlockSizes: BlockSizeConstraints? = nil
    ) {
        self.name = name
        self.description = description
        self.size = size
        self.flags = flags
        self.advertisedBlockSizes = advertisedBlockSizes
    }

    /// Builds the description from the `NBD_REP_INFO` replies of a successful INFO or GO.
    @_spi(NBDMachines) public init(requestedName: String, replies: [OptionReply.Body]) throws(NBDError) {
        var info = NBDExportInfo(name: requestedName, size: 0, flags: [])
        var sawExport = false
        for case .info(let item) in replies {
            switch item {
            case .export(let size, let flags):
                info.size = size
                info.flags = flags
                sawExport = true
            case .name(let name): info.name = name
            case .description(let text): info.description = text
            case .blockSize(let sizes):
                try sizes.validate()
                info.advertisedBlockSizes = sizes
            case .unknown: break
            }
        }
        guard sawExport else { throw .serverViolation("no NBD_INFO_EXPORT in the reply") }
        self = info
    }

    /// The constraints in force: the advertised ones, or the spec's defaults.
    public var blockSizes: BlockSizeConstraints { advertisedBlockSizes ?? .default }

    /// Largest READ or WRITE payload sent in one request: the advertised maximum, or 32 MiB
    /// (the spec's "client desiring maximum interoperability SHOULD ... limit ... to 2^25").
    public var maximumPayload: UInt32 {
        guard let advertised = advertisedBlockSizes else { return BlockSizeConstraints.default.maximum }
        let aligned = advertised.maximum / advertised.minimum * advertised.minimum
        return min(aligned, 64 * 1024 * 1024)
    }

    /// `NBD_FLAG_READ_ONLY`: writes are refused.
    public var isReadOnly: Bool { flags.contains(.readOnly) }
    /// `NBD_FLAG_ROTATIONAL`: behaves like a spinning disk.
    public var isRotational: Bool { flags.contains(.rotational) }
    /// `NBD_FLAG_SEND_FLUSH`: ``NBDCore/CommandType/flush`` is supported.
    public var canFlush: Bool { flags.contains(.sendFlush) }
    /// `NBD_FLAG_SEND_FUA`: the FUA flag is supported.
    public var canFUA: Bool { flags.contains(.sendFUA) }
    /// `NBD_FLAG_SEND_TRIM`: trim is supported.
    public var canTrim: Bool { flags.contains(.sendTrim) }
    /// `NBD_FLAG_SEND_WRITE_ZEROES`: write zeroes is supported.
    public var canZero: Bool { flags.contains(.sendWriteZeroes) }
    /// `NBD_FLAG_SEND_FAST_ZERO`: the FAST_ZERO flag is supported.
    public var canFastZero: Bool { flags.contains(.sendFastZero) }
    /// `NBD_FLAG_SEND_CACHE`: cache is supported.
    public var canCache: Bool { flags.contains(.sendCache) }
    /// `NBD_FLAG_SEND_DF`: the don't-fragment flag is supported on reads.
    public var canDF: Bool { flags.contains(.sendDF) }
    /// `NBD_FLAG_BLOCK_STATUS_PAYLOAD`: block status can be asked for some contexts only
    /// (advertised only with extended headers).
    public var canBlockStatusPayload: Bool { flags.contains(.blockStatusPayload) }
    /// `NBD_FLAG_SEND_RESIZE`: the size can be changed (the experimental RESIZE extension).
    public var canResize: Bool { flags.contains(.sendResize) }
    /// `NBD_FLAG_CAN_MULTI_CONN`: several connections see each other's flushed writes.
    public var canMultiConn: Bool { flags.contains(.canMultiConn) }
}
