import Logging
import NIOCore
import NBDCore

/// One client connection: negotiation through ``ServerNegotiationStateMachine``, then requests
/// handled concurrently, each answered as soon as its backend call completes.
final class NBDServerConnectionHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private var negotiation: ServerNegotiationStateMachine
    private var agreement: ServerNegotiationStateMachine.Agreement?
    private var backend: (any NBDServerBackend)?
    private let backends: [String: any NBDServerBackend]
    private let limits: NBDServer.Configuration
    private let logger: Logger
    private var input = ByteBuffer()
    /// A WRITE whose header arrived and whose data has not all arrived yet.
    private var pendingWrite: PendingWrite?
    private var inFlight = 0
    /// Requests run on the connection's own thread: a memory backend answers without a hop.
    private var executor: EventLoopTaskExecutor?
    private var disconnecting = false
    private var shuttingDown = false

    init(exports: [NBDServerExport], configuration: NBDServer.Configuration, logger: Logger) {
        negotiation = ServerNegotiationStateMachine(
            exports: exports.map { export in
                var flags: TransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendCache]
                if export.backend.isReadOnly { flags.insert(.readOnly) } else { flags.formUnion([.sendTrim, .sendWriteZeroes, .sendFastZero]) }
                if export.backend.flushCoversAllConnections { flags.insert(.canMultiConn) }
                return .init(name: export.name, description: export.description, size: export.backend.size, flags: flags,
                             blockSizes: BlockSizeConstraints(minimum: 1, preferred: 4096, maximum: UInt32(configuration.maximumPayload)))
            },
            maximumOptionLength: configuration.maximumOptionLength)
        backends = Dictionary(exports.map { ($0.name, $0.backend) }, uniquingKeysWith: { first, _ in first })
        limits = configuration
        self.logger = logger
    }

    func handlerAdded(context: ChannelHandlerContext) {
        executor = EventLoopTaskExecutor(context.eventLoop)
    }

    func channelActive(context: ChannelHandlerContext) {
        logger.info("client connected", metadata: ["peer": "\(context.remoteAddress.map { "\($0)" } ?? "?")"])
        context.writeAndFlush(wrapOutboundOut(negotiation.greeting()), promise: nil)
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        logger.info("client disconnected")
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        logger.warning("connection error", metadata: ["error": "\(error)"])
        context.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        // Taken as it came when nothing is left over: a WRITE's data then reaches the backend
        // as a slice of the receive buffer, not copied.
        if input.readableBytes == 0 {
            input = bytes
        } else {
            input.writeBuffer(&bytes)
        }
        do {
            if agreement == nil { try negotiate(context: context) }
            if agreement != nil { try transmit(context: context) }
        } catch {
            // A client that breaks the protocol gets a hard disconnect, and nothing else.
            logger.warning("closing a misbehaving client", metadata: ["error": "\(error)"])
            context.close(promise: nil)
        }
        // Let go of a receive buffer that is read, so that SwiftNIO can reuse it.
        if input.readableBytes == 0 { input = ByteBuffer() }
    }

    // MARK: Negotiation

    private func negotiate(context: ChannelHandlerContext) throws {
        while agreement == nil {
            switch try negotiation.receive(&input) {
            case .wait:
                return
            case .send(let bytes):
                context.writeAndFlush(wrapOutboundOut(bytes), promise: nil)
            case .close(let bytes):
                let channel = context.channel
                context.writeAndFlush(wrapOutboundOut(bytes)).whenComplete { _ in channel.close(promise: nil) }
                return
            case .enterTransmission(let bytes, let agreed):
                context.writeAndFlush(wrapOutboundOut(bytes), promise: nil)
                agreement = agreed
                backend = backends[agreed.export.name]
                logger.info("export opened", metadata: ["export": "\(agreed.export.name)", "structured": "\(agreed.structuredReplies)"])
            }
        }
    }

    // MARK: Transmission

    private func transmit(context: ChannelHandlerContext) throws {
        while true {
            if var pending = pendingWrite {
                pendingWrite = nil
                pending.append(input.readSlice(length: min(input.readableBytes, pending.missing))!)
                guard pending.missing == 0 else {
                    pendingWrite = pending
                    return
                }
                handle(pending.header, data: pending.segments, context: context)
                continue
            }
            guard let header = try RequestHeader.decode(from: &input) else { return }
            if disconnecting { throw NBDError.violation("request after NBD_CMD_DISC") }
            guard header.type == .write else {
                handle(header, data: [], context: context)
                continue
            }
            // Beyond the maximum payload the data cannot be waited for: hard disconnect.
            guard Int(header.length) <= limits.maximumPayload else {
                throw NBDError.violation("write of \(header.length) bytes exceeds the maximum payload")
            }
            if let data = input.readSlice(length: Int(header.length)) {
                // All here: handed on as a slice of what was read, without a copy.
                handle(header, data: [data], context: context)
            } else {
                pendingWrite = PendingWrite(header)
            }
        }
    }

    private func handle(_ request: RequestHeader, data: [ByteBuffer], context: ChannelHandlerContext) {
        if request.type == .disconnect {
            // "The server MUST handle all outstanding requests ... and close the TCP session."
            disconnecting = true
            closeIfDone(context: context)
            return
        }
        if shuttingDown {
            reply(request, .failure(NBDServerError(.ESHUTDOWN, "the server is shutting down")), context: context)
            return
        }
        if let error = check(request) {
            reply(request, .failure(error), context: context)
            return
        }
        guard inFlight < limits.maximumRequestsInFlight else {
            logger.warning("client exceeded \(limits.maximumRequestsInFlight) requests in flight; closing")
            context.close(promise: nil)
            return
        }
        inFlight += 1
        let backend = self.backend!
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        let boundContext = NIOLoopBound(context, eventLoop: context.eventLoop)
        let structured = agreement!.structuredReplies
        Task(executorPreference: executor) {
            let result = await RequestPerformer.run(request, data: data, backend: backend, structured: structured)
            handler.eventLoop.runOnLoop { handler.value.finish(request, result, context: boundContext.value) }
        }
    }

    private func finish(_ request: RequestHeader, _ result: Result<RequestPerformer.Reply, NBDServerError>, context: ChannelHandlerContext) {
        inFlight -= 1
        reply(request, result, context: context)
        closeIfDone(context: context)
    }

    private func closeIfDone(context: ChannelHandlerContext) {
        if (disconnecting || shuttingDown) && inFlight == 0 { context.close(promise: nil) }
    }

    /// The server is stopping: finish what is in flight, refuse the rest, then close.
    func shutDown(context: ChannelHandlerContext) {
        shuttingDown = true
        if agreement == nil { context.close(promise: nil) } else { closeIfDone(context: context) }
    }

    /// The spec's checks on a request; an error value to answer with, or nil to go ahead.
    private func check(_ request: RequestHeader) -> NBDServerError? {
        let agreement = self.agreement!
        let allowed: CommandFlags
        switch request.type {
        case .read: allowed = [.fua, .dontFragment]
        case .write, .trim: allowed = [.fua]
        case .flush, .cache: allowed = [.fua]
        case .writeZeroes: allowed = [.fua, .noHole, .fastZero]
        case .blockStatus: allowed = [.fua, .requestOne]
        default: return NBDServerError(.EINVAL, "unknown command \(request.type.rawValue)")
        }
        guard request.flags.subtracting(allowed).isEmpty else {
            return NBDServerError(.EINVAL, "flags 0x\(String(request.flags.rawValue, radix: 16)) are not valid for \(request.type)")
        }
        if [.write, .trim, .writeZeroes].contains(request.type), agreement.flags.contains(.readOnly) {
            return NBDServerError(.EPERM, "the export is read-only")
        }
        if request.type == .read, Int(request.length) > limits.maximumPayload {
            return NBDServerError(.EOVERFLOW, "read of \(request.length) bytes exceeds the maximum payload")
        }
        if request.type == .blockStatus, agreement.metaContexts.isEmpty {
            return NBDServerError(.EINVAL, "no metadata context was selected")
        }
        if request.type != .flush {
            let (end, overflow) = request.offset.addingReportingOverflow(UInt64(request.length))
            guard !overflow, end <= agreement.export.size else {
                return NBDServerError([.write, .writeZeroes].contains(request.type) ? .ENOSPC : .EINVAL, "range past the end of the export")
            }
        }
        return nil
    }

    private func reply(_ request: RequestHeader, _ result: Result<RequestPerformer.Reply, NBDServerError>, context: ChannelHandlerContext) {
        let structured = agreement!.structuredReplies
        var header = context.channel.allocator.buffer(capacity: 64)
        switch result {
        case .failure(let error):
            logger.debug("request failed", metadata: ["command": "\(request.type)", "error": "\(error.errno)"])
            if structured {
                let chunk = ReplyChunk.error(.error, errno: error.errno, message: String(error.message.utf8.prefix(nbdMaximumStringLength))!, offset: nil)
                Self.chunk(chunk, type: .error, cookie: request.cookie, done: true, into: &header)
            } else {
                ReplyHeader.simple(SimpleReplyHeader(error: error.errno, cookie: request.cookie)).encode(into: &header)
            }
        case .success(.done):
            ReplyHeader.simple(SimpleReplyHeader(cookie: request.cookie)).encode(into: &header)
        case .success(.extents(let extents)):
            Self.chunk(.blockStatus(contextID: ServerNegotiationStateMachine.baseAllocationID, descriptors: extents), type: .blockStatus,
                       cookie: request.cookie, done: true, into: &header)
        case .success(.data(let parts)):
            if !structured {
                ReplyHeader.simple(SimpleReplyHeader(cookie: request.cookie)).encode(into: &header)
                context.write(wrapOutboundOut(header), promise: nil)
                for case .data(let bytes) in parts { context.write(wrapOutboundOut(bytes), promise: nil) }
            } else {
                // Headers go in small buffers; the data itself is written as it is, not copied.
                for part in Self.structuredRead(request, parts: parts) { context.write(wrapOutboundOut(part), promise: nil) }
            }
            context.flush()
            return
        }
        context.writeAndFlush(wrapOutboundOut(header), promise: nil)
    }

    /// A structured READ: one data chunk per run of consecutive data parts (its payload written
    /// as the parts themselves), a hole chunk per hole, the last chunk flagged
    /// NBD_REPLY_FLAG_DONE. Returns the buffers to write in order.
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
                let header = StructuredReplyHeader(flags: index == parts.endIndex ? .done : [], type: .offsetData, cookie: request.cookie, length: UInt32(8 + length))
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
        ReplyHeader.structured(StructuredReplyHeader(flags: done ? .done : [], type: type, cookie: cookie, length: UInt32(payload.readableBytes))).encode(into: &out)
        out.writeBuffer(&payload)
    }
}

/// Runs one request against a backend, off the event loop.
enum RequestPerformer {
    static func run(_ request: RequestHeader, data: [ByteBuffer], backend: any NBDServerBackend, structured: Bool) async -> Result<Reply, NBDServerError> {
        do {
            return .success(try await perform(request, data: data, backend: backend, structured: structured))
        } catch let error as NBDServerError {
            return .failure(error)
        } catch {
            return .failure(NBDServerError(.EIO, "\(error)"))
        }
    }

    enum Reply: Sendable {
        case done
        case data([NBDServerReadPart])
        case extents([BlockDescriptor])
    }

    static func perform(_ request: RequestHeader, data: [ByteBuffer], backend: any NBDServerBackend, structured: Bool) async throws -> Reply {
        let fua = request.flags.contains(.fua)
        switch request.type {
        case .read:
            guard request.length > 0 else { return .data([]) }
            // With structured replies holes go out as NBD_REPLY_TYPE_OFFSET_HOLE; with simple
            // replies, or when the client asked not to fragment, as zero bytes.
            if structured && !request.flags.contains(.dontFragment) {
                return .data(try await backend.readSparse(at: request.offset, length: Int(request.length)))
            }
            return .data([.data(try await backend.read(at: request.offset, length: Int(request.length)))])
        case .write:
            try await backend.write(segments: data, at: request.offset, fua: fua)
        case .flush:
            try await backend.flush()
        case .trim:
            try await backend.trim(at: request.offset, length: UInt64(request.length))
            if fua { try await backend.flush() }
        case .cache:
            break
        case .writeZeroes:
            // "MUST fail quickly with NBD_ENOTSUP unless the request can be serviced in less time than a corresponding NBD_CMD_WRITE"
            if request.flags.contains(.fastZero), !backend.zeroIsFast { throw NBDServerError(.ENOTSUP, "zeroing is not faster than writing here") }
            try await backend.zero(at: request.offset, length: UInt64(request.length), noHole: request.flags.contains(.noHole))
            if fua { try await backend.flush() }
        case .blockStatus:
            var extents = try await backend.extents(at: request.offset, length: max(1, UInt64(request.length)))
            if request.flags.contains(.requestOne), let first = extents.first {
                extents = [BlockDescriptor(length: min(first.length, max(1, request.length)), flags: first.flags)]
            }
            return .extents(extents)
        default:
            break
        }
        return .done
    }

}
