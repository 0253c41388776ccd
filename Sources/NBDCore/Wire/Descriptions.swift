// How the public values print: as a person reads them, by the spec's names.

extension HandshakeFlags: CustomStringConvertible {
    /// The flags by the spec's names, e.g. `NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES`.
    public var description: String {
        flagNames(rawValue, [(Self.fixedNewstyle.rawValue, "NBD_FLAG_FIXED_NEWSTYLE"), (Self.noZeroes.rawValue, "NBD_FLAG_NO_ZEROES")])
    }
}

extension ClientFlags: CustomStringConvertible {
    /// The flags by the spec's names.
    public var description: String {
        flagNames(rawValue, [(Self.fixedNewstyle.rawValue, "NBD_FLAG_C_FIXED_NEWSTYLE"), (Self.noZeroes.rawValue, "NBD_FLAG_C_NO_ZEROES")])
    }
}

extension TransmissionFlags: CustomStringConvertible {
    /// The flags by the spec's names, e.g. `NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH`.
    public var description: String {
        let names: [(Self, String)] = [
            (.hasFlags, "NBD_FLAG_HAS_FLAGS"), (.readOnly, "NBD_FLAG_READ_ONLY"), (.sendFlush, "NBD_FLAG_SEND_FLUSH"),
            (.sendFUA, "NBD_FLAG_SEND_FUA"), (.rotational, "NBD_FLAG_ROTATIONAL"), (.sendTrim, "NBD_FLAG_SEND_TRIM"),
            (.sendWriteZeroes, "NBD_FLAG_SEND_WRITE_ZEROES"), (.sendDF, "NBD_FLAG_SEND_DF"),
            (.canMultiConn, "NBD_FLAG_CAN_MULTI_CONN"), (.sendResize, "NBD_FLAG_SEND_RESIZE"),
            (.sendCache, "NBD_FLAG_SEND_CACHE"), (.sendFastZero, "NBD_FLAG_SEND_FAST_ZERO"),
            (.blockStatusPayload, "NBD_FLAG_BLOCK_STATUS_PAYLOAD"),
        ]
        return flagNames(rawValue, names.map { ($0.0.rawValue, $0.1) })
    }
}

extension BlockSizeConstraints: CustomStringConvertible {
    /// E.g. `minimum 1, preferred 4096, maximum 33554432`.
    public var description: String { "minimum \(minimum), preferred \(preferred), maximum \(maximum)" }
}

extension NBDMetaContext: CustomStringConvertible {
    /// The name, with the server's id when it gave one: `base:allocation (id 1)`.
    public var description: String { id == 0 ? name : "\(name) (id \(id))" }
}

/// `A | B` for the bits of `raw` that have names, then any others in hex; `none` for 0.
package func flagNames<Raw: FixedWidthInteger>(_ raw: Raw, _ names: [(Raw, String)], separator: String = " | ") -> String {
    var parts = names.filter { raw & $0.0 != 0 }.map(\.1)
    let unnamed = names.reduce(raw) { $0 & ~$1.0 }
    if unnamed != 0 { parts.append("0x" + String(unnamed, radix: 16)) }
    return parts.isEmpty ? "none" : parts.joined(separator: separator)
}
