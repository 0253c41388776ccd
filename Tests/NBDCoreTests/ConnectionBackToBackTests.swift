import NIOCore
@_spi(NBDMachines) import TestSupport
import Testing

@_spi(NBDMachines) @testable import NBDCore

/// The client and server connection machines run back to back in memory, as swift-nio-ssh
/// tests its machines: every byte one sends is dripped to the other in random-sized pieces
/// from a seeded generator, and the server completes its requests in a shuffled order.
@Suite("Client and server machines back to back")
struct ConnectionBackToBackTests {
    @Test(arguments: [
        (TransmissionFormat.extended, UInt64(1)), (.structured, 2), (.simple, 3), (.extended, 4), (.structured, 5), (.simple, 6),
    ])
    func everyOptionAndEveryCommandByContent(format: TransmissionFormat, seed: UInt64) throws {
        var pair = Pair(seed: seed)
        try pair.connect()
        let listing = try pair.option(.list).compactMap { reply -> String? in
            if case .server(let name, _) = reply { name } else { nil }
        }
        #expect(listing == ["disk", "ro", "resizable", "small-payload", "huge"])
        let info = try NBDExportInfo(
            requestedName: "disk",
            replies: pair.option(.info(export: "disk", requests: [.name, .description, .blockSize]))
        )
        #expect(info.size == Pair.size && info.description == "scratch" && info.blockSizes.maximum == 1 << 20)
        if format == .extended {
            #expect(try pair.option(.extendedHeaders) == [.ack])
            // "NBD_REP_ERR_EXT_HEADER_REQD: The client has already successfully negotiated extended headers"
            #expect(
                try pair.option(.structuredReply) == [
                    .error(.errExtendedHeaderRequired, message: "extended headers are on, and take precedence")
                ]
            )
        } else if format == .structured {
            #expect(try pair.option(.structuredReply) == [.ack])
        }
        let structured = format.hasChunks
        if structured {
            let listed = try pair.option(.listMetaContext(export: "disk", queries: []))
            #expect(listed == [.metaContext(id: 0, name: "base:allocation"), .ack])
            #expect(
                try pair.option(.setMetaContext(export: "disk", queries: ["base:allocation"])) == [
                    .metaContext(id: 1, name: "base:allocation"), .ack,
                ]
            )
        }
        let start = try pair.go("disk")
        #expect(start.format == format)
        #expect(start.metaContexts.map(\.description) == (structured ? ["base:allocation (id 1)"] : []))

        // Writes of random data at random places, then reads of all of it, checked against a model.
        // Requests in flight together may be done in any order: those at once do not overlap,
        // and those that overlap them wait for their replies, as a client that cares must.
        var model = [UInt8](repeating: 0, count: Int(Pair.size))
        var requests: [Pair.Request] = []
        let slot = Int(Pair.size) / 12
        for index in 0..<12 {
            let data = (0..<Int(1 + pair.random(70_000))).map { _ in UInt8(truncatingIfNeeded: pair.random(256)) }
            let offset = index * slot + Int(pair.random(UInt64(slot - data.count)))
            model.replaceSubrange(offset..<offset + data.count, with: data)
            requests.append(pair.submit(.write, offset: UInt64(offset), length: UInt64(data.count), payload: ByteBuffer(bytes: data)))
        }
        try pair.settle()
        requests.append(pair.submit(.writeZeroes, offset: 4096, length: 8192))
        model.replaceSubrange(4096..<12288, with: repeatElement(0, count: 8192))
        requests.append(pair.submit(.trim, offset: 200_000, length: 4096))
        model.replaceSubrange(200_000..<204_096, with: repeatElement(0, count: 4096))
        requests.append(pair.submit(.flush, offset: 0, length: 0))
        requests.append(pair.submit(.cache, offset: 0, length: 65536))
        try pair.settle()
        for request in requests { #expect(request.error == nil && request.isDone) }

        let reads = stride(from: 0, to: Int(Pair.size), by: 100_000).map { start in
            pair.submit(.read, offset: UInt64(start), length: UInt64(min(100_000, Int(Pair.size) - start)))
        }
        try pair.settle()
        for read in reads {
            #expect(read.error == nil)
            #expect(
                Array(read.data.readableBytesView) == Array(model[Int(read.offset)..<Int(read.offset) + Int(read.length)]),
                "read at \(read.offset)"
            )
        }
        if structured {
            let status = pair.submit(.blockStatus, offset: 0, length: Pair.size)
            try pair.settle()
            #expect(status.error == nil)
            #expect(status.extents[1]?.reduce(0) { $0 + $1.length } == Pair.size)
        }
        if format == .extended {
            // The payload form: block status for context 1 only.
            let filtered = pair.submit(.blockStatus, offset: 4096, length: Pair.size - 4096, onlyContexts: [1])
            try pair.settle()
            #expect(filtered.error == nil)
            #expect(filtered.extents[1]?.reduce(0) { $0 + $1.length } == Pair.size - 4096)
        }
        // A soft disconnect: NBD_CMD_DISC, then the server closes.
        pair.client.disconnectRequested(waiter: nil)
        try pair.settle()
        #expect(pair.serverClosed)
    }

    @Test func theInFlightCapHoldsRequestsBackInOrder() throws {
        var pair = Pair(seed: 9, maximumInFlight: 3)
        try pair.open("disk", options: [.structuredReply])
        pair.holding = true
        let reads = (0..<20).map { pair.submit(.read, offset: UInt64($0) * 4096, length: 4096) }
        try pair.settle()
        // Three on the wire, the rest waiting in the client's queue.
        #expect(pair.performing.count == 3)
        pair.holding = false
        try pair.settle()
        #expect(pair.mostPerformedAtOnce == 3)
        #expect(reads.allSatisfy { $0.isDone && $0.error == nil && $0.data.readableBytes == 4096 })
    }

    @Test func theServersRefusalsReachTheRightRequests() throws {
        var pair = Pair(seed: 5)
        pair.badSector = 512 * 1000
        try pair.connect()
        // Structured replies carry the server's message with its error.
        _ = try pair.option(.structuredReply)
        _ = try pair.go("disk")
        let before = pair.submit(.read, offset: 0, length: 512)
        let bad = pair.submit(.read, offset: 512 * 1000, length: 512)
        let after = pair.submit(.read, offset: 1024, length: 512)
        try pair.settle()
        #expect(bad.error?.serverErrno == .EIO && bad.error?.serverMessage == "bad sector" && bad.error?.connectionUsable == true)
        #expect(before.error == nil && before.data.readableBytes == 512)
        #expect(after.error == nil && after.data.readableBytes == 512)
    }

    /// Strict mode in the client's machine: what the export does not allow is refused before
    /// the wire, and nothing reaches the server.
    @Test func strictModeRefusesBeforeTheWire() throws {
        var pair = Pair(seed: 7)
        try pair.open("ro")
        pair.holding = true
        let write = pair.submit(.write, offset: 0, length: 4, payload: ByteBuffer(bytes: [1, 2, 3, 4]))
        let past = pair.submit(.read, offset: Pair.size, length: 512)
        let empty = pair.submit(.read, offset: 0, length: 0)
        let trim = pair.submit(.trim, offset: 0, length: 512)
        let read = pair.submit(.read, offset: 0, length: 512)
        try pair.settle()
        #expect(pair.performing.map(\.0.type) == [.read])
        pair.holding = false
        try pair.settle()
        #expect(write.error?.code == .notAdvertised && write.error?.serverErrno == nil)
        #expect(trim.error?.code == .notAdvertised)
        #expect(empty.error?.code == .invalidArgument)
        #expect(past.error?.code == .invalidArgument && past.error?.serverErrno == nil)
        #expect(past.error?.message.contains("runs past the end of the export (1048576 bytes)") == true)
        #expect(read.error == nil && read.data.readableBytes == 512)
    }

    @Test func aServerShuttingDownMakesTheClientDisconnectSoftly() throws {
        var pair = Pair(seed: 6)
        try pair.open("disk")
        pair.holding = true
        let first = pair.submit(.read, offset: 0, length: 512)
        try pair.settle()
        #expect(pair.performing.count == 1)
        pair.server.shutdownRequested()
        let second = pair.submit(.read, offset: 512, length: 512)
        try pair.settle()
        // "If the client receives an NBD_ESHUTDOWN error it MUST initiate a soft disconnect."
        #expect(second.error?.serverErrno == .ESHUTDOWN)
        let late = pair.submit(.read, offset: 0, length: 512)
        #expect(!pair.serverClosed)
        pair.holding = false
        try pair.settle()
        #expect(first.isDone && first.error == nil)
        #expect(late.error?.code == .connectionClosed)
        #expect(pair.serverClosed && pair.clientClosed)
    }

    @Test func abortEndsTheNegotiationAfterTheServersAck() throws {
        var pair = Pair(seed: 7)
        try pair.connect()
        let waiter = Pair.Waiter()
        pair.client.disconnectRequested(waiter: waiter)
        try pair.settle()
        #expect(pair.serverClosed && pair.clientClosed)
        pair.client.channelClosed()
        try pair.settle()
        if case .disconnected? = waiter.outcome {
        } else {
            Issue.record("the disconnect was not answered: \(String(describing: waiter.outcome))")
        }
    }

    @Test(arguments: [NBDTLSPolicy.require, .allow])
    func aServerWithoutTLS(policy: NBDTLSPolicy) throws {
        var pair = Pair(seed: 8, tlsPolicy: policy)
        let handshake = pair.handshake
        try pair.settle()
        switch policy {
        case .require:
            // "If encryption cannot be negotiated then the connection MUST fail": nothing more is sent.
            #expect(handshake.error?.code == .tlsRequired)
            #expect(pair.clientClosed)
        default:
            guard case .connected? = handshake.outcome else {
                Issue.record("not connected in clear")
                return
            }
            #expect(!pair.clientClosed)
        }
    }

    /// A client that requires TLS and a server that requires it: STARTTLS first, then the
    /// whole negotiation again over TLS, then data. A client in clear learns nothing but that
    /// TLS is required.
    @Test(arguments: [NBDServerTLSMode.require, .on])
    func startTLSBackToBack(mode: NBDServerTLSMode) throws {
        var pair = Pair(seed: 21, tlsPolicy: .require, serverTLS: mode)
        try pair.connect()
        #expect(pair.client.tlsVersion == "tlsv13")
        let start = try pair.go("disk")
        #expect(start.info.size == Pair.size)
        let write = pair.submit(.write, offset: 4096, length: 4, payload: ByteBuffer(bytes: [1, 2, 3, 4]))
        let read = pair.submit(.read, offset: 4096, length: 4)
        try pair.settle()
        #expect(write.isDone && write.error == nil && Array(read.data.readableBytesView) == [1, 2, 3, 4])

        var plain = Pair(seed: 22, serverTLS: mode)
        try plain.connect()
        if mode == .require {
            #expect(try plain.option(.list).first?.isError == true)
            #expect { try plain.go("disk") } throws: { ($0 as? NBDError)?.optionReply == .errTLSRequired }
        } else {
            #expect(try plain.go("disk").info.size == Pair.size)
        }
    }

    @Test func aSilentServerTimesOut() throws {
        var pair = Pair(seed: 10, serverSilent: true)
        try pair.settle()
        #expect(pair.timerArmed)
        pair.client.timerFired()
        try pair.settle()
        #expect(pair.handshake.error?.code == .timedOut)
        #expect(pair.clientClosed)
    }

    @Test func aRequestNotAnsweredInTimeFailsEveryRequestAndClosesTheConnection() throws {
        var pair = Pair(seed: 12, maximumInFlight: 2, requestTimeout: .seconds(8))
        try pair.open("disk")
        pair.holding = true
        let reads = (0..<4).map { pair.submit(.read, offset: UInt64($0) * 4096, length: 4096) }
        try pair.settle()
        #expect(pair.timerArmed && pair.timerDelay == .seconds(1))
        // Eight ticks of a second: the time is not over until more than 8 s have passed.
        for _ in 0..<8 { try pair.fireClientTimer() }
        #expect(reads.allSatisfy { !$0.isDone } && !pair.clientClosed)
        try pair.fireClientTimer()
        // Those on the wire and those queued behind them, all with the same error.
        #expect(reads.allSatisfy { $0.error?.code == .timedOut })
        #expect(reads[0].error?.message == "the server did not answer NBD_CMD_READ at offset 0 within 8 s; the connection was closed")
        #expect(pair.clientClosed)
    }

    @Test func answersInTimeKeepTheConnectionAndStopTheClock() throws {
        var pair = Pair(seed: 13, requestTimeout: .seconds(8))
        try pair.open("disk")
        pair.holding = true
        let slow = pair.submit(.read, offset: 0, length: 4096)
        try pair.settle()
        for _ in 0..<6 { try pair.fireClientTimer() }
        // Answered after six seconds; a request sent then has eight seconds of its own.
        pair.holding = false
        try pair.settle()
        #expect(slow.isDone && slow.error == nil)
        pair.holding = true
        let next = pair.submit(.read, offset: 4096, length: 4096)
        try pair.settle()
        for _ in 0..<7 { try pair.fireClientTimer() }
        pair.holding = false
        try pair.settle()
        #expect(next.isDone && next.error == nil && !pair.clientClosed)
        // Nothing on the wire: the clock stops instead of ticking for ever.
        try pair.fireClientTimer()
        #expect(!pair.timerArmed)
    }

    /// Valid server replies with random bytes changed, 400 times: whatever the numbers say,
    /// the client ends each run with answers or typed errors, never a trap; a reply the
    /// corruption left unfinished (a DONE flag cleared, a cookie changed) waits only until the
    /// request timeout. (Changed data bytes are valid replies: no protocol can tell.)
    @Test func corruptedServerBytesGiveTypedErrorsNeverATrap() throws {
        var failures = 0
        for seed in UInt64(1)...400 {
            var pair = Pair(seed: seed, requestTimeout: .seconds(8))
            pair.corruptOneIn = 8
            do {
                try pair.open("disk", options: [.structuredReply, .setMetaContext(export: "disk", queries: ["base:allocation"])])
                let requests = [
                    pair.submit(.write, offset: 4096, length: 8, payload: ByteBuffer(bytes: [1, 2, 3, 4, 5, 6, 7, 8])),
                    pair.submit(.read, offset: 0, length: 65536),
                    pair.submit(.blockStatus, offset: 0, length: Pair.size),
                    pair.submit(.read, offset: 4096, length: 8),
                ]
                try pair.settle()
                for _ in 0..<10 where pair.timerArmed && !requests.allSatisfy(\.isDone) { try pair.fireClientTimer() }
                #expect(requests.allSatisfy { $0.isDone || $0.error != nil }, "seed \(seed): a request was left waiting")
                if requests.contains(where: { $0.error != nil }) { failures += 1 }
            } catch {
                failures += 1
            }
        }
        // Most runs meet a corrupted byte that matters; some do not.
        #expect(failures > 100, "\(failures) of 400 runs failed")
    }

    @Test func aRequestWhileAnOptionIsPendingIsRefusedAndNothingIsSent() throws {
        var pair = Pair(seed: 11)
        try pair.connect()
        let first = Pair.Waiter()
        let second = Pair.Waiter()
        pair.client.optionRequested(.list, waiter: first)
        pair.client.optionRequested(.structuredReply, waiter: second)
        try pair.settle()
        #expect(second.error?.code == .invalidArgument)
        if case .optionReplies? = first.outcome {} else { Issue.record("list was not answered") }
    }
}

/// One client machine and one server machine, wired together in memory.
