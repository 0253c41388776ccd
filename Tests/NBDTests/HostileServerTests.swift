import Foundation
import NBD
@_spi(NBDMachines) import NBDCore
import NIOConcurrencyHelpers
import NIOCore
import TestSupport
import Testing

/// The client against a server that misbehaves on purpose: every case ends in a typed error,
/// promptly, with nothing allocated on the server's say-so.
@Suite("Client against a scripted server")
struct HostileServerTests {
    func withServer(_ body: (FakeServer) async throws -> Void) async throws {
        let server = try await FakeServer()
        do {
            try await body(server)
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }

    func code(_ expected: NBDError.Code) -> @Sendable (any Error) -> Bool {
        { ($0 as? NBDError)?.code == expected }
    }

    @Test func notAnNBDServer() async throws {
        try await withServer { server in
            let client = Task { () -> Void in _ = try await NBDConnection.connect(to: server.address) }
            let peer = await server.nextPeer()
            try await peer.send { $0.writeString("SSH-2.0-OpenSSH_9.2\r\n\r\n") }
            await #expect(performing: { try await client.value }, throws: code(.incompatibleServer))
        }
    }

    @Test func oldstyleServerIsNamed() async throws {
        try await withServer { server in
            let client = Task { () -> Void in _ = try await NBDConnection.connect(to: server.address) }
            let peer = await server.nextPeer()
            try await peer.send { ServerGreeting.oldstyle.encode(into: &$0) }
            await #expect(
                performing: { try await client.value },
                throws: { error in
                    (error as? NBDError)?.code == .incompatibleServer && "\(error)".contains("oldstyle")
                }
            )
        }
    }

    @Test func silentServerTimesOut() async throws {
        try await withServer { server in
            var configuration = NBDClientConfiguration()
            configuration.negotiationTimeout = .milliseconds(300)
            await #expect(
                performing: { _ = try await NBDConnection.connect(to: server.address, configuration: configuration) },
                throws: code(.timedOut)
            )
        }
    }

    @Test func hugeOptionReplyIsRefusedWithoutWaitingForIt() async throws {
        try await withServer { server in
            let client = Task { () -> [NBDExportListing] in
                let connection = try await NBDConnection.connect(to: server.address)
                return try await connection.list()
            }
            let peer = await server.nextPeer()
            try await peer.handshake()
            #expect(try await peer.readOption() == .list)
            // A SERVER reply announcing 3 GiB of data, of which nothing follows.
            try await peer.send {
                $0.writeMultipleIntegers(NBDMagic.optionReply, OptionCode.list.rawValue, OptionReplyType.server.rawValue, UInt32(3 << 30))
            }
            await #expect(performing: { _ = try await client.value }, throws: code(.protocolViolation))
        }
    }

    @Test func optionErrorCarriesTheServersMessage() async throws {
        try await withServer { server in
            let client = Task { () -> Void in
                let connection = try await NBDConnection.connect(to: server.address)
                do {
                    _ = try await connection.info("secret")
                    Issue.record("INFO should fail")
                } catch let error as NBDError {
                    #expect(error.code == .optionRejected)
                    #expect(error.optionReply == .errPolicy)
                    #expect(error.serverMessage == "not for you")
                    #expect(error.connectionUsable)
                }
                await connection.abort()
            }
            let peer = await server.nextPeer()
            try await peer.handshake()
            _ = try await peer.readOption()
            try await peer.reply(.info, .error(.errPolicy, message: "not for you"))
            // ABORT is sent, then awaited.
            #expect(try await peer.readOption() == .abort)
            try await peer.reply(.abort, .ack)
            try await client.value
        }
    }

    @Test func tlsRequiredReplyTellsToUseNbds() async throws {
        try await withServer { server in
            let client = Task { () -> Void in _ = try await NBDExport.connect(to: NBDURI(socket: server.path)) }
            let peer = await server.nextPeer()
            try await peer.handshake()
            // The first option (extended headers) refused: TLS first.
            let first = try await peer.readOption()
            #expect(first.code == .extendedHeaders)
            try await peer.reply(first.code, .error(.errTLSRequired, message: "TLS required"))
            await #expect(
                performing: { try await client.value },
                throws: { error in
                    (error as? NBDError)?.code == .tlsRequired && "\(error)".contains("nbds://")
                }
            )
        }
    }

    @Test func requiredTLSRefusedByTheServerSendsNothingMore() async throws {
        try await withServer { server in
            let uri = try NBDURI("nbds+unix:///disk?socket=\(server.path)")
            let client = Task { () -> Void in _ = try await NBDExport.connect(to: uri) }
            let peer = await server.nextPeer()
            try await peer.handshake()
            // The first option is STARTTLS; refused, the client hangs up without another word.
            #expect(try await peer.readOption() == .startTLS)
            try await peer.reply(.startTLS, .error(.errUnsupported, message: "no TLS here"))
            await #expect(performing: { try await client.value }, throws: code(.tlsRequired))
            try await waitUntil("the client to close the connection") { peer.isClosed }
            #expect(peer.available == 0)
        }
    }

    @Test func bytesInClearAfterTheStartTLSAcknowledgementAreRefused() async throws {
        try await withServer { server in
            let uri = try NBDURI("nbds+unix:///disk?socket=\(server.path)")
            let client = Task { () -> Void in _ = try await NBDExport.connect(to: uri) }
            let peer = await server.nextPeer()
            try await peer.handshake()
            _ = try await peer.readOption()
            // An injected reply rides along with the ACK, in clear: a downgrade attempt.
            try await peer.send {
                OptionReply(option: .startTLS, body: .ack).encode(into: &$0)
                OptionReply(option: .structuredReply, body: .ack).encode(into: &$0)
            }
            await #expect(throws: NBDError.self) { try await client.value }
        }
    }

    @Test func shutdownReplyLeadsToASoftDisconnect() async throws {
        try await withServer { server in
            let client = Task { () -> Void in
                let connection = try await NBDConnection.connect(to: server.address)
                _ = try await connection.list()
            }
            let peer = await server.nextPeer()
            try await peer.handshake()
            _ = try await peer.readOption()
            try await peer.reply(.list, .error(.errShutdown, message: "going down"))
            // "If the client receives NBD_REP_ERR_SHUTDOWN it MUST initiate a soft disconnect."
            #expect(try await peer.readOption() == .abort)
            try await peer.reply(.abort, .ack)
            await #expect(performing: { try await client.value }, throws: { ($0 as? NBDError)?.optionReply == .errShutdown })
        }
    }

    @Test func goRefusedAsUnsupportedFallsBackToExportName() async throws {
        try await withServer { server in
            let client = Task { () -> ByteBuffer in
                let connection = try await NBDConnection.connect(to: server.address)
                let export = try await connection.go("disk")
                #expect(export.size == 4096)
                let data = try await export.read(at: 0, length: 512)
                await export.disconnect()
                return data
            }
            let peer = await server.nextPeer()
            try await peer.handshake()
            _ = try await peer.readOption()
            try await peer.reply(.go, .error(.errUnsupported, message: ""))
            #expect(try await peer.readOption() == .exportName("disk"))
            // NO_ZEROES was agreed: size and flags only.
            try await peer.send { ExportNameReply(size: 4096, flags: [.hasFlags]).encode(into: &$0, noZeroes: true) }
            let request = try await peer.readRequest()
            #expect(request.type == .read && request.length == 512)
            try await peer.send {
                ReplyHeader.simple(SimpleReplyHeader(cookie: request.cookie)).encode(into: &$0)
                $0.writeRepeatingByte(0xAB, count: 512)
            }
            #expect(try await peer.readRequest().type == .disconnect)
            #expect(try await client.value == ByteBuffer(repeating: 0xAB, count: 512))
        }
    }

    @Test func serverClosingMidReplyFailsEveryRequestPromptly() async throws {
        try await withServer { server in
            let client = Task { () -> [Result<ByteBuffer, any Error>] in
                let connection = try await NBDConnection.connect(to: server.address)
                let export = try await connection.go()
                return await withTaskGroup(of: Result<ByteBuffer, any Error>.self) { group in
                    for index in 0..<3 {
                        group.addTask {
                            do { return .success(try await export.read(at: UInt64(index) * 4096, length: 4096)) } catch {
                                return .failure(error)
                            }
                        }
                    }
                    return await group.reduce(into: []) { $0.append($1) }
                }
            }
            let peer = await server.nextPeer()
            try await peer.handshake()
            try await peer.acceptGo()
            var requests: [RequestHeader] = []
            for _ in 0..<3 { requests.append(try await peer.readRequest()) }
            // Half of a reply, then gone.
            try await peer.send {
                ReplyHeader.simple(SimpleReplyHeader(cookie: requests[0].cookie)).encode(into: &$0)
                $0.writeRepeatingByte(1, count: 100)
            }
            await peer.close()
            let results = try await client.value
            #expect(results.count == 3)
            for result in results {
                #expect(throws: NBDError.self) { try result.get() }
                if case .failure(let error as NBDError) = result {
                    #expect(error.code == .connectionClosed)
                    #expect(!error.connectionUsable)
                }
            }
        }
    }

    @Test func unknownCookieIsAViolationThatClosesTheConnection() async throws {
        try await withServer { server in
            let client = Task { () -> Void in
                let connection = try await NBDConnection.connect(to: server.address)
                let export = try await connection.go()
                await #expect(performing: { try await export.flush() }, throws: { ($0 as? NBDError)?.code == .protocolViolation })
                // Afterwards every request fails at once.
                await #expect(throws: NBDError.self) { try await export.flush() }
            }
            let peer = await server.nextPeer()
            try await peer.handshake()
            try await peer.acceptGo()
            let request = try await peer.readRequest()
            try await peer.send {
                ReplyHeader.simple(SimpleReplyHeader(cookie: NBDCookie(request.cookie.rawValue &+ 1000))).encode(into: &$0)
            }
            try await client.value
            // Hard disconnect: the client closed its side.
            try await waitUntil("the client to close the connection") { peer.isClosed }
        }
    }

    @Test func requestsInFlightAreCappedAndMatchedOutOfOrder() async throws {
        try await withServer { server in
            var configuration = NBDClientConfiguration()
            configuration.maximumRequestsInFlight = 4
            let client = Task { () -> [ByteBuffer] in
                let connection = try await NBDConnection.connect(to: server.address, configuration: configuration)
                let export = try await connection.go()
                let results = try await withThrowingTaskGroup(of: (Int, ByteBuffer).self) { group in
                    for index in 0..<12 {
                        group.addTask { (index, try await export.read(at: UInt64(index) * 512, length: 512)) }
                    }
                    return try await group.reduce(into: [:]) { $0[$1.0] = $1.1 }
                }
                await export.disconnect()
                return (0..<12).map { results[$0]! }
            }
            let peer = await server.nextPeer()
            try await peer.handshake()
            try await peer.acceptGo(size: 12 * 512)
            var answered = 0
            while answered < 12 {
                var batch: [RequestHeader] = []
                for _ in 0..<min(4, 12 - answered) { batch.append(try await peer.readRequest()) }
                // The cap: nothing more arrives while 4 are unanswered. A pause on purpose: what
                // is checked is that nothing comes, so a busy machine can only hide a failure.
                try await Task.sleep(for: .milliseconds(100))
                #expect(peer.available == 0)
                for request in batch.reversed() {
                    try await peer.send {
                        ReplyHeader.simple(SimpleReplyHeader(cookie: request.cookie)).encode(into: &$0)
                        $0.writeRepeatingByte(UInt8(request.offset / 512), count: 512)
                    }
                }
                answered += batch.count
            }
            #expect(try await peer.readRequest().type == .disconnect)
            let results = try await client.value
            for (index, data) in results.enumerated() { #expect(data == ByteBuffer(repeating: UInt8(index), count: 512)) }
        }
    }

    @Test func strictModeSendsNothing() async throws {
        try await withServer { server in
            let client = Task { () -> Void in
                let connection = try await NBDConnection.connect(to: server.address)
                let export = try await connection.go()
                await #expect(performing: { try await export.trim(at: 0, length: 512) }, throws: code(.notAdvertised))
                await #expect(
                    performing: { try await export.write(ByteBuffer(repeating: 1, count: 512), at: 0, flags: .fua) },
                    throws: code(.notAdvertised)
                )
                await #expect(performing: { _ = try await export.read(at: 1 << 20, length: 1) }, throws: code(.invalidArgument))
                await #expect(performing: { _ = try await export.read(at: 0, length: 0) }, throws: code(.invalidArgument))
                await #expect(performing: { _ = try await export.blockStatus(at: 0, length: 512) }, throws: code(.notAdvertised))
                await #expect(performing: { try await export.cache(at: 0, length: 512) }, throws: code(.notAdvertised))
                await export.disconnect()
            }
            let peer = await server.nextPeer()
            try await peer.handshake()
            try await peer.acceptGo(flags: [.hasFlags])
            // The first thing after GO is the disconnect: none of the refused requests went out.
            #expect(try await peer.readRequest().type == .disconnect)
            try await client.value
        }
    }

    @Test func cancelledRequestIsDroppedAndItsLateReplyDiscarded() async throws {
        try await withServer { server in
            let slowArrived = NIOLockedValueBox(false)
            let peerTask = Task { () -> Void in
                let peer = await server.nextPeer()
                try await peer.handshake()
                try await peer.acceptGo()
                let slow = try await peer.readRequest()
                slowArrived.withLockedValue { $0 = true }
                let next = try await peer.readRequest()
                // The cancelled read's reply comes late, then the next one's.
                for request in [slow, next] {
                    try await peer.send {
                        ReplyHeader.simple(SimpleReplyHeader(cookie: request.cookie)).encode(into: &$0)
                        $0.writeRepeatingByte(request == slow ? 0xEE : 0x11, count: Int(request.length))
                    }
                }
                #expect(try await peer.readRequest().type == .disconnect)
            }
            let connection = try await NBDConnection.connect(to: server.address)
            let export = try await connection.go()
            let slow = Task { try await export.read(at: 0, length: 4096) }
            // Cancelled once on the wire: its reply must then be read and dropped.
            try await waitUntil("the read to reach the server") { slowArrived.withLockedValue { $0 } }
            slow.cancel()
            await #expect(throws: CancellationError.self) { _ = try await slow.value }
            #expect(try await export.read(at: 4096, length: 512) == ByteBuffer(repeating: 0x11, count: 512))
            await export.disconnect()
            try await peerTask.value
        }
    }
}

extension HostileServerTests {
    /// A request from a task cancelled before it was sent fails with CancellationError and
    /// sends nothing: its event loop promise is failed, not dropped (a dropped one stopped a
    /// debug build of `nbd copy` as "leaking promise", when a journal's checkpoint flush was
    /// cancelled at the end of a copy).
    @Test func aRequestFromACancelledTaskFailsAndSendsNothing() async throws {
        try await withServer { server in
            let peerTask = Task { () -> Void in
                let peer = await server.nextPeer()
                try await peer.handshake()
                try await peer.acceptGo()
                // The first request the server sees is the read after the cancelled ones.
                let read = try await peer.readRequest()
                #expect(read.type == .read)
                try await peer.send {
                    ReplyHeader.simple(SimpleReplyHeader(cookie: read.cookie)).encode(into: &$0)
                    $0.writeRepeatingByte(0x11, count: Int(read.length))
                }
                #expect(try await peer.readRequest().type == .disconnect)
            }
            let connection = try await NBDConnection.connect(to: server.address)
            let export = try await connection.go()
            let cancelled = Task {
                withUnsafeCurrentTask { $0?.cancel() }
                try await export.flush()
            }
            await #expect(throws: CancellationError.self) { try await cancelled.value }
            let cancelledRead = Task {
                withUnsafeCurrentTask { $0?.cancel() }
                return try await export.read(at: 0, length: 512)
            }
            await #expect(throws: CancellationError.self) { _ = try await cancelledRead.value }
            #expect(try await export.read(at: 4096, length: 512) == ByteBuffer(repeating: 0x11, count: 512))
            await export.disconnect()
            try await peerTask.value
        }
    }

    @Test func everyReplyDrippedOneByteAtATime() async throws {
        try await withServer { server in
            let client = Task { () -> ([NBDExportListing], ByteBuffer) in
                let connection = try await NBDConnection.connect(to: server.address)
                let list = try await connection.list()
                _ = try await connection.enableStructuredReplies()
                let export = try await connection.go("b")
                let data = try await export.read(at: 0, length: 8)
                await export.disconnect()
                return (list, data)
            }
            let peer = await server.nextPeer()
            func drip(_ encode: (inout ByteBuffer) -> Void) async throws {
                var buffer = ByteBuffer()
                encode(&buffer)
                for byte in buffer.readableBytesView { try await peer.send { $0.writeInteger(byte) } }
            }
            try await drip { ServerGreeting.newstyle([.fixedNewstyle, .noZeroes]).encode(into: &$0) }
            _ = try await peer.read(4)
            _ = try await peer.readOption()
            try await drip {
                OptionReply(option: .list, body: .server(name: "a", description: "first")).encode(into: &$0)
                OptionReply(option: .list, body: .server(name: "b", description: "")).encode(into: &$0)
                OptionReply(option: .list, body: .ack).encode(into: &$0)
            }
            _ = try await peer.readOption()
            try await drip { OptionReply(option: .structuredReply, body: .ack).encode(into: &$0) }
            _ = try await peer.readOption()
            try await drip {
                OptionReply(option: .go, body: .info(.export(size: 4096, flags: [.hasFlags]))).encode(into: &$0)
                OptionReply(option: .go, body: .ack).encode(into: &$0)
            }
            let request = try await peer.readRequest()
            try await drip {
                ReplyHeader.structured(StructuredReplyHeader(flags: [], type: .offsetData, cookie: request.cookie, length: 12)).encode(
                    into: &$0
                )
                $0.writeInteger(UInt64(4))
                $0.writeBytes([5, 6, 7, 8])
                ReplyHeader.structured(StructuredReplyHeader(flags: .done, type: .offsetHole, cookie: request.cookie, length: 12)).encode(
                    into: &$0
                )
                $0.writeMultipleIntegers(UInt64(0), UInt32(4))
            }
            #expect(try await peer.readRequest().type == .disconnect)
            let (list, data) = try await client.value
            #expect(list == [NBDExportListing(name: "a", description: "first"), NBDExportListing(name: "b", description: "")])
            #expect(data == ByteBuffer(bytes: [0, 0, 0, 0, 5, 6, 7, 8]))
        }
    }
}

extension HostileServerTests {
    @Test func shutdownErrorInTransmissionLeadsToASoftDisconnect() async throws {
        try await withServer { server in
            let client = Task { () -> NBDError? in
                let connection = try await NBDConnection.connect(to: server.address)
                let export = try await connection.go()
                do {
                    try await export.flush()
                    return nil
                } catch let error as NBDError {
                    return error
                }
            }
            let peer = await server.nextPeer()
            try await peer.handshake()
            try await peer.acceptGo()
            let request = try await peer.readRequest()
            try await peer.send { ReplyHeader.simple(SimpleReplyHeader(error: .ESHUTDOWN, cookie: request.cookie)).encode(into: &$0) }
            // "If the client receives an NBD_ESHUTDOWN error it MUST initiate a soft disconnect."
            #expect(try await peer.readRequest().type == .disconnect)
            let error = try await client.value
            #expect(error?.serverErrno == .ESHUTDOWN)
        }
    }

    @Test func largeReadIsSplitAtTheMaximumPayload() async throws {
        try await withServer { server in
            let client = Task { () -> ByteBuffer in
                let connection = try await NBDConnection.connect(to: server.address)
                let export = try await connection.go(requests: [.blockSize])
                let data = try await export.read(at: 0, length: 3 * 4096 + 512)
                await export.disconnect()
                return data
            }
            let peer = await server.nextPeer()
            try await peer.handshake()
            _ = try await peer.readOption()
            try await peer.reply(.go, .info(.export(size: 1 << 20, flags: [.hasFlags])))
            try await peer.reply(.go, .info(.blockSize(BlockSizeConstraints(minimum: 512, preferred: 4096, maximum: 4096))))
            try await peer.reply(.go, .ack)
            var lengths: [UInt64] = []
            for _ in 0..<4 {
                let request = try await peer.readRequest()
                lengths.append(request.length)
                try await peer.send {
                    ReplyHeader.simple(SimpleReplyHeader(cookie: request.cookie)).encode(into: &$0)
                    $0.writeRepeatingByte(UInt8(request.offset / 4096 + 1), count: Int(request.length))
                }
            }
            #expect(lengths == [4096, 4096, 4096, 512])
            #expect(try await peer.readRequest().type == .disconnect)
            var expected = ByteBuffer()
            for piece in 0..<3 { expected.writeRepeatingByte(UInt8(piece + 1), count: 4096) }
            expected.writeRepeatingByte(4, count: 512)
            #expect(try await client.value == expected)
        }
    }

    @Test func blockStatusWithoutTheWalkedContextIsAViolationNotAHang() async throws {
        try await withServer { server in
            let client = Task { () -> Void in
                let connection = try await NBDConnection.connect(to: server.address)
                #expect(try await connection.enableStructuredReplies())
                _ = try await connection.setMetaContexts(queries: ["base:allocation", "qemu:dirty-bitmap:b"])
                let export = try await connection.go()
                for try await _ in export.extents(of: .baseAllocation) {}
            }
            let peer = await server.nextPeer()
            try await peer.handshake()
            #expect(try await peer.readOption().code == .structuredReply)
            try await peer.reply(.structuredReply, .ack)
            #expect(try await peer.readOption().code == .setMetaContext)
            try await peer.reply(.setMetaContext, .metaContext(id: 1, name: "base:allocation"))
            try await peer.reply(.setMetaContext, .metaContext(id: 2, name: "qemu:dirty-bitmap:b"))
            try await peer.reply(.setMetaContext, .ack)
            try await peer.acceptGo(size: 1 << 20, flags: [.hasFlags])
            let request = try await peer.readRequest()
            #expect(request.type == .blockStatus && request.offset == 0 && request.length == 1 << 20)
            // An answer for the bitmap only: nothing to walk base:allocation on with.
            try await peer.send {
                ReplyHeader.structured(StructuredReplyHeader(flags: .done, type: .blockStatus, cookie: request.cookie, length: 12)).encode(
                    into: &$0
                )
                ReplyChunk.blockStatus(contextID: 2, descriptors: [BlockDescriptor(length: 1 << 20, flags: 0)]).encode(into: &$0)
            }
            await #expect(
                performing: { try await client.value },
                throws: { error in
                    (error as? NBDError)?.code == .protocolViolation && "\(error)".contains("a chunk for every context asked for")
                }
            )
        }
    }

    @Test func aServerThatStopsAnsweringFailsEveryRequestAtTheRequestTimeout() async throws {
        try await withServer { server in
            var configuration = NBDClientConfiguration()
            // Long enough that the first answer comes within it however busy the machine.
            configuration.requestTimeout = .seconds(2)
            let client = Task { () -> [NBDError?] in
                let connection = try await NBDConnection.connect(to: server.address, configuration: configuration)
                let export = try await connection.go()
                return await withTaskGroup(of: NBDError?.self) { group in
                    for index in 0..<8 {
                        group.addTask {
                            do {
                                _ = try await export.read(at: UInt64(index) * 512, length: 512)
                                return nil
                            } catch {
                                return error as? NBDError
                            }
                        }
                    }
                    return await group.reduce(into: []) { $0.append($1) }
                }
            }
            let peer = await server.nextPeer()
            try await peer.handshake()
            try await peer.acceptGo()
            // One answer, then nothing: the server froze.
            let first = try await peer.readRequest()
            try await peer.send {
                ReplyHeader.simple(SimpleReplyHeader(cookie: first.cookie)).encode(into: &$0)
                $0.writeRepeatingByte(1, count: 512)
            }
            let errors = try await client.value
            #expect(errors.filter { $0 == nil }.count == 1)
            #expect(errors.compactMap { $0 }.count == 7)
            #expect(errors.compactMap { $0 }.allSatisfy { $0.code == .timedOut && $0.message.contains("within 2 s") })
            // Closed hard: what the server did with the rest is unknown.
            try await waitUntil("the client to close the connection") { peer.isClosed }
        }
    }

    @Test func aResetConnectionIsSaidInWords() async throws {
        let server = try await FakeServer(overTCP: true)
        let client = Task { () -> Void in
            let connection = try await NBDConnection.connect(to: server.address)
            let export = try await connection.go()
            _ = try await export.read(at: 0, length: 512)
        }
        let peer = await server.nextPeer()
        try await peer.handshake()
        try await peer.acceptGo()
        _ = try await peer.readRequest()
        // SO_LINGER 0: closing sends a TCP reset instead of a clean end.
        let options = try #require(peer.channel as? any SocketOptionProvider)
        try await options.setSoLinger(linger(l_onoff: 1, l_linger: 0)).get()
        await peer.close()
        await #expect(
            performing: { try await client.value },
            throws: { error in
                guard let error = error as? NBDError else { return false }
                return error.code == .connectionClosed
                    && "\(error)" == "the connection failed: the server reset the connection (ECONNRESET)"
            }
        )
        await server.stop()
    }

    @Test(arguments: [UInt64(1) << 63, UInt64.max])
    func anExportOf2To63BytesOrMoreIsRefusedWithATypedError(size: UInt64) async throws {
        try await withServer { server in
            let client = Task { () -> Void in
                let connection = try await NBDConnection.connect(to: server.address)
                _ = try await connection.go("huge")
            }
            let peer = await server.nextPeer()
            try await peer.handshake()
            _ = try await peer.readOption()
            try await peer.reply(.go, .info(.export(size: size, flags: [.hasFlags])))
            await #expect(
                performing: { try await client.value },
                throws: { error in
                    guard let error = error as? NBDError else { return false }
                    return error.code == .incompatibleServer && error.message.contains("export of \(size) bytes, 2^63 or more")
                }
            )
        }
    }

    @Test func exportNameWithAHugeSizeIsRefusedAndTheLargestUsableSizeIsNot() async throws {
        try await withServer { server in
            let client = Task { () -> Void in
                let connection = try await NBDConnection.connect(to: server.address)
                _ = try await connection.exportName("huge")
            }
            let peer = await server.nextPeer()
            try await peer.handshake()
            _ = try await peer.readOption()
            try await peer.send { ExportNameReply(size: UInt64(1) << 63, flags: [.hasFlags]).encode(into: &$0, noZeroes: true) }
            await #expect(performing: { try await client.value }, throws: { ($0 as? NBDError)?.code == .incompatibleServer })
        }
        try await withServer { server in
            let client = Task { () -> UInt64 in
                let connection = try await NBDConnection.connect(to: server.address)
                let export = try await connection.go("largest")
                defer { Task { await export.close() } }
                return export.size
            }
            let peer = await server.nextPeer()
            try await peer.handshake()
            try await peer.acceptGo(size: UInt64(Int64.max), flags: [.hasFlags])
            #expect(try await client.value == UInt64(Int64.max))
        }
    }
}
