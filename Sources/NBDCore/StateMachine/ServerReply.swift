import NIOCore

/// One part of a sparse read, in order: what a server's backend reads.
public enum NBDServerReadPart: Sendable {
    /// Bytes of data.
    case data(ByteBuffer)
    /// This many bytes that read as zeroes.
    case hole(Int)
}

/// What performing one request gave, before it is framed for the wire.
public enum ServerReply: Sendable {
    /// Success with nothing to send but the reply header.
    case done
    /// A READ's data and holes, in order from the request's offset.
    case data([NBDServerReadPart])
    /// The extents of a BLOCK_STATUS for `base:allocation`.
    case extents([BlockDescriptor])
    /// Failure with this error value, and a message for the client when replies are structured.
    case failed(NBDErrno, message: String)

    /// The buffers to write, in order: simple replies, or structured chunks with the last one
    /// flagged `NBD_REPLY_FLAG_DONE`. READ data is written as the buffers it came in, not copied.
    func framed(for request: RequestHeader, structured: Bool, contextID: UInt32) -> [ByteBuffer] {
        var header = ByteBuffer()
        switch self {
        case .failed(let errno, let message):
            if structured {
                let chunk = ReplyChunk.error(
                    .error,
                    errno: errno,
                    message: message.truncated(toUTF8Bytes: nbdMaximumStringLength),
                    offset: nil
                )
                Self.chunk(chunk, type: .error, cookie: request.cookie, done: true, into: &header)
            } else {
                ReplyHeader.simple(SimpleReplyHeader(error: errno, cookie: request.cookie)).encode(into: &header)
            }
        case .done:
            ReplyHeader.simple(SimpleReplyHeader(cookie: request.cookie)).encode(into: &header)
        case .extents(let extents):
            Self.chunk(
                .blockStatus(contextID: contextID, descriptors: extents),
                type: .blockStatus,
                cookie: request.cookie,
                done: true,
                into: &header
            )
        case .data(let parts):
            guard structured else {
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
            return Self.structuredRead(request, parts: parts)
        }
        return [header]
    }

    /// A structured READ: one data chunk per run of consecutive data parts (its payload written
    /// as the parts themselves), a hole chunk per hole, the last chunk flagged
    /// NBD_REPLY_FLAG_DONE ("The server MUST NOT send ... further chunks" after it).
    static func structuredRead(_ request: RequestHeader, parts: [NBDServerReadPart]) -> [ByteBuffer] {
        var buffers: [ByteBuffer] = []
        var out = ByteBuffer()
        var offset = request.offset
        var index = parts.startIndex
        while index < parts.endIndex {
            switch parts[index] {
            case .hole(let count):
                let done = index == parts.endIndex - 1
                chunk(.offsetHole(offset: offset, length: UInt32(count)), type: .offsetHole, cookie: request.cookie, done: done, into: &out)
                offset += UInt64(count)
                index += 1
            case .data:
                var run: [ByteBuffer] = []
                while index < parts.endIndex, case .data(let bytes) = parts[index] {
                    run.append(bytes)
                    index += 1
                }
                let length = run.reduce(0) { $0 + $1.readableBytes }
                let flags: ReplyFlags = index == parts.endIndex ? .done : []
                let header = StructuredReplyHeader(flags: flags, type: .offsetData, cookie: request.cookie, length: UInt32(8 + length))
                ReplyHeader.structured(header).encode(into: &out)
                out.writeInteger(offset)
                buffers.append(out)
                out = ByteBuffer()
                buffers.append(contentsOf: run)
                offset += UInt64(length)
            }
        }
        if parts.isEmpty {
            chunk(.none, type: .none, cookie: request.cookie, done: true, into: &out)
        }
        if out.readableBytes > 0 { buffers.append(out) }
        return buffers
    }

    private static func chunk(_ chunk: ReplyChunk, type: ReplyChunkType, cookie: UInt64, done: Bool, into out: inout ByteBuffer) {
        var payload = ByteBuffer()
        chunk.encode(into: &payload)
        let header = StructuredReplyHeader(flags: done ? .done : [], type: type, cookie: cookie, length: UInt32(payload.readableBytes))
        ReplyHeader.structured(header).encode(into: &out)
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
