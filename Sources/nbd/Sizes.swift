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
}
