import NBD

/// Every size and offset on the command line goes through here: a number of bytes with an
/// optional K, M, G or T suffix (powers of 1024), as nbdkit, nbdcopy and qemu-img take them.
enum Sizes {
    static func parse(_ text: String) throws -> UInt64 {
        switch ByteCount.parse(text) {
        case .success(let bytes): return bytes
        case .failure(.notANumber): throw CommandError("not a size: \"\(text)\" (use a number of bytes, optionally with K, M, G or T)")
        case .failure(.tooLarge): throw CommandError("size \"\(text)\" is too large")
        }
    }

    /// The bytes `--offset` and `--length` name in an export of `size` bytes: to the end
    /// without a length. An offset past the end is refused; so is a length that runs past it,
    /// unless `lengthMayRunPast` (a dump stops at the end, as nbddump does).
    static func range(offset: UInt64, length: UInt64?, in size: UInt64, lengthMayRunPast: Bool) throws -> Range<UInt64> {
        guard offset <= size else { throw CommandError("--offset \(offset) is past the end of the export (\(size) bytes)") }
        if let length, length > size - offset, !lengthMayRunPast {
            throw CommandError("--offset \(offset) --length \(length) runs past the end of the export (\(size) bytes)")
        }
        // Not offset + length: a huge --length would wrap.
        return offset..<offset + min(length ?? .max, size - offset)
    }
}
