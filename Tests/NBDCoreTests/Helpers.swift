import NIOCore
import Testing

@_spi(NBDMachines) @testable import NBDCore

/// Bytes from a hex string with spaces and comments-free groups, e.g. "4e42444d 41474943".
func hex(_ text: String) -> [UInt8] {
    let digits = text.filter(\.isHexDigit)
    precondition(digits.count % 2 == 0)
    var bytes: [UInt8] = []
    var index = digits.startIndex
    while index < digits.endIndex {
        let next = digits.index(index, offsetBy: 2)
        bytes.append(UInt8(digits[index..<next], radix: 16)!)
        index = next
    }
    return bytes
}

/// Decodes `bytes` given one byte at a time (every prefix must ask for more and leave the
/// reader where it was) and all at once (which must consume everything).
func decodeBothWays<T>(
    _ bytes: [UInt8],
    sourceLocation: SourceLocation = #_sourceLocation,
    _ decode: (inout ByteBuffer) throws -> T?
) throws -> T {
    for length in 0..<bytes.count {
        var partial = ByteBuffer(bytes: bytes[0..<length])
        let value = try decode(&partial)
        #expect(value == nil, "a prefix of \(length) bytes decoded", sourceLocation: sourceLocation)
        #expect(partial.readerIndex == 0, "a prefix of \(length) bytes moved the reader", sourceLocation: sourceLocation)
    }
    var whole = ByteBuffer(bytes: bytes)
    let value = try #require(try decode(&whole), sourceLocation: sourceLocation)
    #expect(whole.readableBytes == 0, sourceLocation: sourceLocation)
    return value
}

func encoded(_ encode: (inout ByteBuffer) -> Void) -> [UInt8] {
    var buffer = ByteBuffer()
    encode(&buffer)
    return Array(buffer.readableBytesView)
}
