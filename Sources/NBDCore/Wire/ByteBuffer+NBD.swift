import NIOCore

/// The spec's bound on every string: "MUST be no longer than 4096 bytes".
@_spi(NBDMachines) public let nbdMaximumStringLength = 4096

extension ByteBuffer {
    /// Reads `length` bytes as UTF-8 text; invalid sequences are replaced, never trusted.
    mutating func readNBDString(length: Int) -> String? {
        guard let bytes = readSlice(length: length) else { return nil }
        return String(decoding: bytes.readableBytesView, as: UTF8.self)
    }

    /// Writes a 32-bit length then the UTF-8 bytes of `string`.
    mutating func writeLengthPrefixedString(_ string: String) {
        writeInteger(UInt32(string.utf8.count))
        writeString(string)
    }

    /// Reads a 32-bit length then that many bytes of text from a client's option, refusing
    /// lengths over `limit`: the client broke the rule, and the error says so.
    mutating func readClientString(limit: Int = nbdMaximumStringLength) throws(NBDError) -> String? {
        guard let length = readInteger(as: UInt32.self) else { return nil }
        guard length <= limit else { throw .clientViolation("string of \(length) bytes exceeds \(limit)") }
        return readNBDString(length: Int(length))
    }

    /// Runs `body` and rewinds the reader index when it returns nil (too few bytes yet) or throws.
    mutating func rewindingOnNil<T>(_ body: (inout ByteBuffer) throws(NBDError) -> T?) throws(NBDError) -> T? {
        let saved = readerIndex
        do {
            guard let value = try body(&self) else {
                moveReaderIndex(to: saved)
                return nil
            }
            return value
        } catch {
            moveReaderIndex(to: saved)
            throw error
        }
    }
}
