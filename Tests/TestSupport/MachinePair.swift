@_spi(NBDMachines) import NBDCore
import NIOCore

/// The client and server connection machines run back to back in memory, as swift-nio-ssh
/// tests its machines: every byte one sends is dripped to the other in random-sized pieces
/// from a seeded generator, and the server completes its requests in a shuffled order. The
/// server's storage is a memory disk of its own, or whatever ``performer`` does (the pool
/// simulation's disk, shared by every connection to it).
@_spi(NBDMachines) public struct Pair {
    @_spi(NBDMachines) public final class Request {
        @_spi(NBDMachines) public let command: CommandType, offset: UInt64, length: UInt64
        @_spi(NBDMachines) public var payload: ByteBuffer?
        @_spi(NBDMachines) public var data = ByteBuffer()
        @_spi(NBDMachines) public var extents: [UInt32: [BlockDescriptor]] = [:]
        @_spi(NBDMachines) public var error: NBDError?
        @_spi(NBDMachines) public var isDone = false
        /// Whatever its submitter wants to find it by.
        @_spi(NBDMachines) public var tag = 0
        @_spi(NBDMachines) public init(command: CommandType, offset: UInt64, length: UInt64, payload: ByteBuffer?) {
            self.command = command
            self.offset = offset
            self.length = length
            self.payload = payload
            if command == .read { data = ByteBuffer(repeating: 0xEE, count: Int(length)) }
        }
    }

    @_spi(NBDMachines) public final class Waiter {
        @_spi(NBDMachines) public var outcome: ClientConnectionOutcome?
        @_spi(NBDMachines) public var error: NBDError?
        @_spi(NBDMachines) public init() {}
    }

    @_spi(NBDMachines) public static let size: UInt64 = 1 << 20
    @_spi(NBDMachines) public static let hugeSize: UInt64 = 8 << 30
    /// Where the server's disk is bad, when set: a read there fails with EIO.
    @_spi(NBDMachines) public var badSector: UInt64?
    /// Every request the server was handed, in order.
    @_spi(NBDMachines) public var performed: [RequestHeader] = []
    /// The largest size a resize may grow the resizable export to; beyond, ENOSPC.
    @_spi(NBDMachines) public static let largestSize: UInt64 = 4 << 20

    @_spi(NBDMachines) public var client: ClientConnectionStateMachine<Request, Waiter>
    @_spi(NBDMachines) public var server: ServerConnectionStateMachine
    @_spi(NBDMachines) public let handshake = Waiter()
    @_spi(NBDMachines) public var generator: UInt64
    @_spi(NBDMachines) public var toServer: [ByteBuffer] = []
    @_spi(NBDMachines) public var toClient: [ByteBuffer] = []
    @_spi(NBDMachines) public var performing: [(RequestHeader, [ByteBuffer], Bool)] = []
    /// Does the server's requests instead of its memory disk, when set.
    @_spi(NBDMachines) public var performer: ((RequestHeader, [ByteBuffer]) -> ServerReply)?
    /// Three pieces in four are a whole buffer (a message, or a write's data) rather than a
    /// random part of one: fewer rounds, for a user that needs many connections.
    @_spi(NBDMachines) public var dripsWhole = false
    /// The requests the client machine completed, in the order it did.
    @_spi(NBDMachines) public var completed: [Request] = []
    /// The memory disk's bytes (empty for a pair with exports of its own).
    @_spi(NBDMachines) public var storage: [UInt8]
    @_spi(NBDMachines) public var mostPerformedAtOnce = 0
    @_spi(NBDMachines) public var serverClosed = false
    /// The server machine asked to stop reading (its connection holds as much as it may).
    @_spi(NBDMachines) public var serverPaused = false
    @_spi(NBDMachines) public var clientClosed = false
    @_spi(NBDMachines) public var timerArmed = false
    @_spi(NBDMachines) public var timerDelay: TimeAmount?
    /// Requests stay with the server, unanswered, while set.
    @_spi(NBDMachines) public var holding = false
    /// When not 0, one piece in this many that the server sends has a byte changed.
    @_spi(NBDMachines) public var corruptOneIn: UInt64 = 0
    @_spi(NBDMachines) public let serverSilent: Bool
    /// Each side is ready for its TLS handshake; once both are, it "happens" (no encryption
    /// here: the machines only learn that it succeeded).
    @_spi(NBDMachines) public var serverAwaitsTLS = false
    @_spi(NBDMachines) public var clientAwaitsTLS = false

    @_spi(NBDMachines) public init(
        seed: UInt64,
        maximumInFlight: Int = 64,
        tlsPolicy: NBDTLSPolicy = .disable,
        serverTLS: NBDServerTLSMode = .off,
        serverSilent: Bool = false,
        requestTimeout: TimeAmount? = nil,
        exports: [ServerNegotiationStateMachine.Export]? = nil
    ) {
        generator = seed
        storage = exports == nil ? [UInt8](repeating: 0, count: Int(Pair.size)) : []
        self.serverSilent = serverSilent
        client = ClientConnectionStateMachine(
            configuration: .init(maximumRequestsInFlight: maximumInFlight, tlsPolicy: tlsPolicy, requestTimeout: requestTimeout),
            handshakeWaiter: handshake
        )
        let blockSizes = BlockSizeConstraints(minimum: 1, preferred: 4096, maximum: 1 << 20)
        server = ServerConnectionStateMachine(
            exports: exports ?? [
                .init(
                    name: "disk",
                    description: "scratch",
                    size: Pair.size,
                    flags: [.hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .sendCache],
                    blockSizes: blockSizes
                ),
                .init(name: "ro", size: Pair.size, flags: [.hasFlags, .readOnly], blockSizes: blockSizes),
                .init(
                    name: "resizable",
                    size: Pair.size,
                    flags: [.hasFlags, .sendFlush, .sendWriteZeroes, .sendResize],
                    blockSizes: blockSizes
                ),
                // Payloads of at most 64 KiB: larger reads and writes go in pieces.
                .init(
                    name: "small-payload",
                    size: Pair.size,
                    flags: [.hasFlags, .sendFlush, .sendTrim],
                    blockSizes: BlockSizeConstraints(minimum: 1, preferred: 4096, maximum: 64 << 10)
                ),
                // 8 GiB, of which only the first MiB holds data: for requests of 4 GiB or more.
                .init(name: "huge", size: Pair.hugeSize, flags: [.hasFlags, .sendTrim, .sendWriteZeroes], blockSizes: blockSizes),
            ],
            maximumOptionLength: 4096,
            limits: .init(maximumPayload: 1 << 20, maximumRequestsInFlight: 16),
            tlsMode: serverTLS
        )
        client.channelActive()
        if !serverSilent { server.channelActive() }
    }

    /// A number in 0..<bound from a seeded generator (SplitMix64).
    @_spi(NBDMachines) public mutating func random(_ bound: UInt64) -> UInt64 {
        generator &+= 0x9E37_79B9_7F4A_7C15
        var z = generator
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return (z ^ (z >> 31)) % max(1, bound)
    }

    @_spi(NBDMachines) public mutating func connect() throws {
        try settle()
        guard case .connected? = handshake.outcome else {
            throw NBDError.invalidArgument("no handshake: \(String(describing: handshake.error))")
        }
    }

    @_spi(NBDMachines) public mutating func option(_ option: OptionRequest) throws -> [OptionReply.Body] {
        let waiter = Waiter()
        client.optionRequested(option, waiter: waiter)
        try settle()
        if let error = waiter.error {
            if let reply = error.optionReply { return [.error(reply, message: error.serverMessage ?? "")] }
            throw error
        }
        guard case .optionReplies(let replies)? = waiter.outcome else { throw NBDError.invalidArgument("\(option.code) unanswered") }
        return replies
    }

    @_spi(NBDMachines) public mutating func go(_ name: String) throws -> ClientTransmissionStart {
        let waiter = Waiter()
        client.optionRequested(.go(export: name, requests: [.blockSize]), waiter: waiter)
        try settle()
        guard case .transmissionStarted(let start)? = waiter.outcome else {
            throw waiter.error ?? NBDError.invalidArgument("GO unanswered")
        }
        return start
    }

    /// Connects, sends `options` (their replies unread), then GO to `export`: transmission.
    @_spi(NBDMachines) public mutating func open(_ export: String, options: [OptionRequest] = []) throws {
        try connect()
        for request in options { _ = try option(request) }
        _ = try go(export)
    }

    /// The client's timer goes off, and both sides run.
    @_spi(NBDMachines) public mutating func fireClientTimer() throws {
        timerArmed = false
        client.timerFired()
        try settle()
    }

    @_spi(NBDMachines) public mutating func submit(
        _ command: CommandType,
        offset: UInt64,
        length: UInt64,
        payload: ByteBuffer? = nil,
        flags: CommandFlags = [],
        onlyContexts: [UInt32]? = nil
    ) -> Request {
        let request = Request(command: command, offset: offset, length: length, payload: payload)
        client.requestSubmitted(request, command: command, flags: flags, offset: offset, length: length, onlyContexts: onlyContexts)
        return request
    }

    /// Runs both machines until neither has anything left to do.
    @_spi(NBDMachines) public mutating func settle() throws {
        var rounds = 0
        while step() {
            rounds += 1
            guard rounds < 100_000 else { throw NBDError.invalidArgument("the machines never settle") }
        }
    }

    /// One round: every action of both sides, a random piece of bytes each way, and some
    /// requests completed out of order. False once nothing moved.
    @_spi(NBDMachines) public mutating func step() -> Bool {
        var moved = false
        while let action = client.next() {
            moved = true
            clientPerform(action)
        }
        // What the client's handler writes once it has nothing else to do.
        let output = client.takeOutput()
        if output.readableBytes > 0 { toServer.append(output) }
        while let action = server.next() {
            moved = true
            serverPerform(action)
        }
        var queue = toServer
        toServer = []
        if !serverPaused, let piece = drip(&queue) {
            moved = true
            server.bytesReceived(piece)
        }
        toServer = queue + toServer
        queue = toClient
        toClient = []
        if var piece = drip(&queue) {
            moved = true
            if corruptOneIn > 0, random(corruptOneIn) == 0, piece.readableBytes > 0 {
                // A hostile or broken server: one byte of what it sends, changed.
                let index = piece.readerIndex + Int(random(UInt64(piece.readableBytes)))
                piece.setInteger(piece.getInteger(at: index, as: UInt8.self)! ^ UInt8(1 + random(255)), at: index)
            }
            client.bytesReceived(piece)
        }
        toClient = queue + toClient
        if serverAwaitsTLS, clientAwaitsTLS, toServer.isEmpty, toClient.isEmpty {
            moved = true
            (serverAwaitsTLS, clientAwaitsTLS) = (false, false)
            server.tlsEstablished(identity: "alice")
            client.tlsEstablished(version: "tlsv13", cipherSuite: nil)
        }
        mostPerformedAtOnce = max(mostPerformedAtOnce, performing.count)
        if !holding, !performing.isEmpty, random(3) == 0 || toServer.isEmpty {
            moved = true
            let (request, data, sparse) = performing.remove(at: Int(random(UInt64(performing.count))))
            server.requestCompleted(request, performer?(request, data) ?? perform(request, data: data, sparse: sparse))
        }
        return moved
    }

    /// A random-sized piece (1 byte to 64 KiB) of the bytes in flight one way.
    @_spi(NBDMachines) public mutating func drip(_ queue: inout [ByteBuffer]) -> ByteBuffer? {
        guard var first = queue.first else { return nil }
        let whole = dripsWhole && random(4) != 0
        let count = whole ? first.readableBytes : Int(1 + random(UInt64(min(first.readableBytes, 1 + Int(random(4)) * 20_000))))
        let piece = first.readSlice(length: count)!
        if first.readableBytes == 0 { queue.removeFirst() } else { queue[0] = first }
        return piece
    }

    @_spi(NBDMachines) public mutating func clientPerform(_ action: ClientConnectionStateMachine<Request, Waiter>.Action) {
        switch action {
        case .write(let bytes):
            toServer.append(bytes)
        case .requestBuffered:
            break
        case .sendRequest(_, let bytes, let request, let range):
            toServer.append(bytes)
            if let payload = request.payload {
                toServer.append(range.map { payload.getSlice(at: payload.readerIndex + $0.lowerBound, length: $0.count)! } ?? payload)
            }
        case .sendDisconnect(let bytes):
            toServer.append(bytes)
            clientClosed = true
        case .startTLS:
            clientAwaitsTLS = true
        case .armTimer(let delay):
            timerArmed = true
            timerDelay = delay
        case .cancelTimer:
            timerArmed = false
        case .succeed(let waiter, let outcome):
            waiter.outcome = outcome
        case .fail(let waiter, let error):
            waiter.error = error
        case .deliverData(let request, let offset, let bytes):
            request.data.setBuffer(bytes, at: Int(offset - request.offset))
        case .deliverHole(let request, let offset, let length):
            request.data.setRepeatingByte(0, count: Int(length), at: Int(offset - request.offset))
        case .deliverExtents(let request, let id, let descriptors):
            request.extents[id] = descriptors
        case .complete(let request, let error):
            request.error = error
            request.isDone = true
            completed.append(request)
        case .cancel(let request):
            request.isDone = true
        case .close:
            clientClosed = true
        case .closeAndFail(let error, let requests, let waiters):
            clientClosed = true
            for request in requests { request.error = error }
            for waiter in waiters { waiter.error = error }
        }
    }

    @_spi(NBDMachines) public mutating func serverPerform(_ action: ServerConnectionStateMachine.Action) {
        switch action {
        case .write(let buffers):
            toClient.append(contentsOf: buffers)
            server.bytesWritten(buffers.reduce(0) { $0 + $1.readableBytes })
        case .pauseReading:
            serverPaused = true
        case .resumeReading:
            serverPaused = false
        case .armTimer, .cancelTimer:
            break
        case .reserveMemory:
            // No budget here: everything asked is granted at once.
            server.memoryGranted()
        case .adjustMemory:
            break
        case .writeAndClose(let bytes):
            toClient.append(bytes)
            serverClosed = true
        case .transmissionStarted:
            break
        case .perform(let request, let operation):
            performing.append((request, operation.payload, operation.isSparseRead))
            performed.append(request)
        case .startTLS(let bytes):
            toClient.append(bytes)
            server.bytesWritten(bytes.readableBytes)
            serverAwaitsTLS = true
        case .close, .fatal:
            serverClosed = true
        }
    }

    /// A memory backend: zero runs of 4 KiB pages read back as holes when `sparse`.
    @_spi(NBDMachines) public mutating func perform(_ request: RequestHeader, data: [ByteBuffer], sparse: Bool) -> ServerReply {
        let range = Int(request.offset)..<Int(request.offset) + Int(request.length)
        if request.type == .trim || request.type == .writeZeroes,
            request.length > ClientConnectionStateMachine<Request, Waiter>.largestEffectLength
        {
            // "MAY reply with an NBD_EOVERFLOW ... error if the oversize request would require too many server resources"
            return .failed(.EOVERFLOW, message: "too large at once")
        }
        if range.upperBound > storage.count, request.type != .read, request.type != .resize {
            // Past the data of the huge export: nothing to store.
            return request.type == .blockStatus ? .extents([BlockDescriptor(length: request.length, flags: 3)]) : .done
        }
        switch request.type {
        case .read where badSector.map { range.contains(Int($0)) } ?? false:
            return .failed(.EIO, message: "bad sector")
        case .read:
            let bytes = Array(storage[range])
            guard sparse, bytes.count > 8192 else { return .data([.data(ByteBuffer(bytes: bytes))]) }
            let half = bytes.count / 2
            let firstHalfIsZero = bytes[..<half].allSatisfy { $0 == 0 }
            if firstHalfIsZero {
                return .data([.hole(half), .data(ByteBuffer(bytes: bytes[half...]))])
            }
            return .data([.data(ByteBuffer(bytes: bytes[..<half])), .data(ByteBuffer(bytes: bytes[half...]))])
        case .write:
            var at = range.lowerBound
            for buffer in data {
                storage.replaceSubrange(at..<at + buffer.readableBytes, with: buffer.readableBytesView)
                at += buffer.readableBytes
            }
            return .done
        case .writeZeroes, .trim:
            storage.replaceSubrange(range, with: repeatElement(0, count: range.count))
            return .done
        case .blockStatus:
            return .extents([BlockDescriptor(length: request.length, flags: 0)])
        case .resize where request.offset > Pair.largestSize:
            return .failed(.ENOSPC, message: "no room")
        case .resize:
            let size = Int(request.offset)
            if size < storage.count {
                storage.removeLast(storage.count - size)
            } else {
                storage += repeatElement(0, count: size - storage.count)
            }
            return .done
        default:
            return .done
        }
    }
}

extension ServerOperation {
    /// A write's data; nothing for any other operation.
    @_spi(NBDMachines) public var payload: [ByteBuffer] { if case .write(let data, _, _) = self { data } else { [] } }
    /// A read that may answer holes as holes.
    @_spi(NBDMachines) public var isSparseRead: Bool { if case .read(_, _, let sparse) = self { sparse } else { false } }
}
