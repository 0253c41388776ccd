import NIOCore

/// What performing one request gave, before it is framed for the wire.
@_spi(NBDMachines) public enum ServerReply: Sendable {
    /// Success with nothing to send but the reply header.
    case done
    /// A READ's data and holes, in order from the request's offset.
    case data([NBDServerReadPart])
    /// The extents of a BLOCK_STATUS for `base:allocation`.
    case extents([BlockDescriptor])
    /// Failure with this error value, and a message for the client when replies are structured.
    case failed(NBDErrno, message: String)

    /// The buffers to write, in order: simple replies, or structured or extended chunks with the
    /// last one flagged `NBD_REPLY_FLAG_DONE`. READ data is written as the buffers it came in,
    /// not copied. `request` is as performed (a filtered BLOCK_STATUS with its effect length).
    func framed(for request: RequestHeader, format: TransmissionFormat, contextID: UInt32) -> [ByteBuffer] {
        let framing = ChunkFraming(request: request, format: format)
        var header = ByteBuffer()
        switch self {
        case .failed(let errno, let message):
            if format.hasChunks {
                let chunk = ReplyChunk.error(
                    .error,
                    errno: errno,
                    message: message.truncated(toUTF8Bytes: nbdMaximumStringLength),
                    offset: nil
                )
                framing.chunk(chunk, type: .error, done: true, into: &header)
            } else {
                ReplyHeader.simple(SimpleReplyHeader(error: errno, cookie: request.cookie)).encode(into: &header)
            }
        case .done:
            Self.frameDone(for: request, format: format, into: &header)
        case .extents(let extents):
            if format == .extended {
                framing.chunk(
                    .blockStatusExtended(contextID: contextID, descriptors: extents),
                    type: .blockStatusExtended,
                    done: true,
                    into: &header
                )
            } else {
                framing.chunk(
                    .blockStatus(contextID: contextID, descriptors: Self.narrow(extents)),
                    type: .blockStatus,
                    done: true,
                    into: &header
                )
            }
        case .data(let parts):
            guard format.hasChunks else {
                // "a simple reply... followed by the data": holes as zero bytes.
                ReplyHeader.simple(SimpleReplyHeader(cookie: request.cookie)).encode(into: &header)
                return [header]
                    + parts.map { part in
                        switch part {
                        case .data(let bytes): bytes
                        case .hole(let count): ByteBuffer(repeating: 0, count: count)
                        }
                    }
            }
            return Self.chunkedRead(framing, parts: parts)
        }
        return [header]
    }

    /// The reply of a request done with nothing to return, written at the end of `buffer`.
    static func frameDone(for request: RequestHeader, format: TransmissionFormat, into buffer: inout ByteBuffer) {
        if format == .extended {
            // "the server MUST NOT use simple replies even when there is no payload"
            ChunkFraming(request: request, format: format).chunk(.none, type: .none, done: true, into: &buffer)
        } else {
            ReplyHeader.simple(SimpleReplyHeader(cookie: request.cookie)).encode(into: &buffer)
        }
    }

    /// Extents as 32-bit descriptors: the list ends at the first one too long for 32 bits,
    /// cut to a length that is (the server "MAY return fewer descriptors in the reply than
    /// would be required to fully specify the whole range").
    static func narrow(_ extents: [BlockDescriptor]) -> [BlockDescriptor] {
        var result: [BlockDescriptor] = []
        for extent in extents {
            let flags = extent.flags & UInt64(UInt32.max)
            guard extent.length <= UInt32.max else {
                result.append(BlockDescriptor(length: UInt64(UInt32.max) & ~4095, flags: flags))
                break
            }
            result.append(BlockDescriptor(length: extent.length, flags: flags))
        }
        return result
    }

    /// A chunked READ: one data chunk per run of consecutive data parts (its payload written
    /// as the parts themselves), a hole chunk per hole, the last chunk flagged
    /// NBD_REPLY_FLAG_DONE ("The server MUST NOT send ... further chunks" after it).
    static func chunkedRead(_ framing: ChunkFraming, parts: [NBDServerReadPart]) -> [ByteBuffer] {
        var buffers: [ByteBuffer] = []
        var out = ByteBuffer()
        var offset = framing.request.offset
        var index = parts.startIndex
        while index < parts.endIndex {
            switch parts[index] {
            case .hole(let count):
                let done = index == parts.endIndex - 1
                framing.chunk(.offsetHole(offset: offset, length: UInt32(count)), type: .offsetHole, done: done, into: &out)
                offset += UInt64(count)
                index += 1
            case .data:
                var run: [ByteBuffer] = []
                while index < parts.endIndex, case .data(let bytes) = parts[index] {
                    run.append(bytes)
                    index += 1
                }
                let length = run.reduce(0) { $0 + $1.readableBytes }
                framing.header(type: .offsetData, length: 8 + length, done: index == parts.endIndex, into: &out)
                out.writeInteger(offset)
                buffers.append(out)
                out = ByteBuffer()
                buffers.append(contentsOf: run)
                offset += UInt64(length)
            }
        }
        if parts.isEmpty {
            framing.chunk(.none, type: .none, done: true, into: &out)
        }
        if out.readableBytes > 0 { buffers.append(out) }
        return buffers
    }
}

/// The chunk headers of one request's reply: structured, or extended with the request's
/// offset ("offset which MUST match the offset of the client's request").
struct ChunkFraming {
    let request: RequestHeader
    let format: TransmissionFormat

    func header(type: ReplyChunkType, length: Int, done: Bool, into out: inout ByteBuffer) {
        let flags: ReplyFlags = done ? .done : []
        if format == .extended {
            let header = ExtendedReplyHeader(
                flags: flags,
                type: type,
                cookie: request.cookie,
                offset: request.offset,
                length: UInt64(length)
            )
            ReplyHeader.extended(header).encode(into: &out)
        } else {
            ReplyHeader.structured(StructuredReplyHeader(flags: flags, type: type, cookie: request.cookie, length: UInt32(length)))
                .encode(into: &out)
        }
    }

    func chunk(_ chunk: ReplyChunk, type: ReplyChunkType, done: Bool, into out: inout ByteBuffer) {
        var payload = ByteBuffer()
        chunk.encode(into: &payload)
        header(type: type, length: payload.readableBytes, done: done, into: &out)
        out.writeBuffer(&payload)
    }
}

extension String {
    /// The longest prefix of at most `count` UTF-8 bytes that ends on a character boundary.
    func truncated(toUTF8Bytes count: Int) -> String {
        guard utf8.count > count else { return self }
        var end = utf8.index(utf8.startIndex, offsetBy: count)
        while end > utf8.startIndex, String.Index(end, within: self) == nil { end = utf8.index(before: end) }
        return String(self[..<end])
    }
}
