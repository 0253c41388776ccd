import ArgumentParser
import Foundation
import NBD
import NIOCore

/// `nbd dump`: a hexdump of an export, in nbddump's format.
struct Dump: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Hexdump an export (like nbddump): offsets, hex, ASCII; repeated lines as *.",
        discussion: """
            Areas that block status reports as zero are not read at all.

            Examples:
              nbd dump nbd://localhost/disk
              nbd dump --offset 4096 --length 512 nbd+unix:///?socket=/tmp/nbd.sock
            """
    )

    @Argument(help: "The export, as an NBD URI.")
    var uri: String

    @Option(name: .long, help: "Where to start (K, M, G, T suffixes; default 0).", transform: Sizes.parse)
    var offset: UInt64 = 0

    @Option(
        name: [.customShort("n"), .long],
        help: "How many bytes to dump (K, M, G, T suffixes; default: to the end).",
        transform: Sizes.parse
    )
    var length: UInt64?

    @OptionGroup var connection: ConnectionOptions

    func run() async throws {
        // One connection: a dump reads in order.
        try await connection.withSingleClient(uri) { client, info in
            let end = try Sizes.range(offset: offset, length: length, in: info.size, lengthMayRunPast: true).upperBound
            var dumper = HexDumper()
            var output = BufferedOutput()
            let reader = AlignedReader(client: client, info: info)
            var zeroes = ZeroExtents(
                try await client.hasMetaContext(.baseAllocation) ? client : nil,
                from: offset,
                to: info.size
            )
            var position = offset
            while position < end {
                // Whole lines inside an area known to read as zeroes: not read at all.
                let zeroEnd = min(end, try await zeroes.end(ofZeroAreaAt: position))
                let zeroLines = (zeroEnd - position) / 16
                if zeroLines > 0 {
                    dumper.zeroLines(from: position, count: zeroLines, into: &output)
                    position += zeroLines * 16
                    continue
                }
                let chunkEnd = min(end, position + (1 << 20))
                let bytes = try await reader.read(from: position, to: chunkEnd)
                var index = 0
                while index < bytes.count {
                    let lineEnd = min(bytes.count, index + 16)
                    dumper.line(offset: position + UInt64(index), bytes: bytes[index..<lineEnd], into: &output)
                    index = lineEnd
                }
                position = chunkEnd
            }
            dumper.finish(into: &output)
            output.flush()
        }
    }
}

/// Turns 16-byte lines into nbddump's text, collapsing repeats into one `*`.
struct HexDumper {
    private var previous: [UInt8]?
    private var collapsed: (offset: UInt64, bytes: [UInt8])?

    mutating func line(offset: UInt64, bytes: ArraySlice<UInt8>, into output: inout BufferedOutput) {
        let content = Array(bytes)
        if content == previous, content.count == 16 {
            if collapsed == nil { write("*\n", to: &output) }
            collapsed = (offset, content)
            return
        }
        collapsed = nil
        previous = content
        write(Self.format(offset: offset, bytes: content), to: &output)
    }

    /// `count` lines of 16 zero bytes from `offset`, without building each one.
    mutating func zeroLines(from offset: UInt64, count: UInt64, into output: inout BufferedOutput) {
        let zero = [UInt8](repeating: 0, count: 16)
        line(offset: offset, bytes: zero[...], into: &output)
        if count > 1 { line(offset: offset + (count - 1) * 16, bytes: zero[...], into: &output) }
    }

    /// Like nbddump, the last line is shown even when it repeats the one before.
    mutating func finish(into output: inout BufferedOutput) {
        if let collapsed { write(Self.format(offset: collapsed.offset, bytes: collapsed.bytes), to: &output) }
    }

    static func format(offset: UInt64, bytes: [UInt8]) -> String {
        var text = String(format: "%010llx: ", offset)
        for index in 0..<16 {
            text += index < bytes.count ? String(format: "%02x ", bytes[index]) : "   "
            if index == 7 { text += " " }
        }
        text += "|"
        for index in 0..<16 {
            guard index < bytes.count else {
                text += " "
                continue
            }
            let byte = bytes[index]
            text += (0x20..<0x7f).contains(byte) ? String(UnicodeScalar(byte)) : "."
        }
        return text + "|\n"
    }

    private func write(_ text: String, to output: inout BufferedOutput) {
        output.write(text)
    }
}

/// Reads any byte range, widening it to the export's minimum block size as strict mode requires.
struct AlignedReader: Sendable {
    let client: NBDClient
    let info: NBDExportInfo

    func read(from start: UInt64, to end: UInt64) async throws -> [UInt8] {
        let block = UInt64(info.blockSizes.minimum)
        let alignedStart = start / block * block
        let alignedEnd = min(info.size, (end + block - 1) / block * block)
        let buffer = try await client.read(at: alignedStart, length: alignedEnd - alignedStart)
        let skip = Int(start - alignedStart)
        return Array(buffer.readableBytesView.dropFirst(skip).prefix(Int(end - start)))
    }
}

/// Where the areas that read as zeroes are, from `base:allocation`, fetched as the dump goes.
struct ZeroExtents {
    private var extents: NBDExtentSequence.AsyncIterator?
    private var current: NBDExtent?

    /// Zero areas from `offset` to `end` by the client's `base:allocation`; none without it.
    init(_ client: NBDClient?, from offset: UInt64, to end: UInt64) {
        extents = client?.extents(in: offset..<end).makeAsyncIterator()
    }

    /// The end of the zero area containing `offset`, or `offset` itself when it holds data.
    /// Offsets must not go back from one call to the next.
    mutating func end(ofZeroAreaAt offset: UInt64) async throws -> UInt64 {
        var position = offset
        while extents != nil {
            // Skip the extents behind: the dump may have read past several since the last call.
            while current.map({ $0.offset + $0.length <= position }) ?? true {
                guard let next = try await extents?.next() else {
                    extents = nil
                    return position
                }
                current = next
            }
            guard let extent = current, extent.offset <= position, case .allocation(let flags) = extent.status,
                flags.contains(.zero)
            else { break }
            position = extent.offset + extent.length
        }
        return position
    }
}
