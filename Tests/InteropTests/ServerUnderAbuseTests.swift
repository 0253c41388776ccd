import Foundation
import NBD
@_spi(NBDMachines) import NBDCore
import NIOConcurrencyHelpers
import NIOCore
import TestSupport
import Testing

@testable import NBDServer

/// The built-in server against clients that try to exhaust it, on real sockets: it holds what
/// its bounds say, drops what nobody will read, and goes on serving everyone else.
@Suite("Built-in server under abuse", .serialized)
struct ServerUnderAbuseTests {
    func start(
        _ folder: ServerProcess,
        _ backend: some NBDServerBackend,
        _ configure: (inout NBDServer.Configuration) -> Void
    ) async throws
        -> (NBDServer, String)
    {
        var configuration = NBDServer.Configuration()
        configure(&configuration)
        let socket = folder.path("abuse.sock")
        return (
            try await NBDServer.start(exports: [NBDServerExport(backend: backend)], on: .unix(path: socket), configuration: configuration),
            socket
        )
    }

    /// `clients` clients that each send 100 READs of `length` bytes, spread over an export of
    /// `exportSize`, and read no reply.
    func readFloods(_ socket: String, clients: Int, length: UInt64, exportSize: UInt64) async throws -> [RawClient] {
        var floods: [RawClient] = []
        for _ in 0..<clients {
            let rude = try await RawClient(socket: socket)
            try await rude.enterTransmission()
            try await rude.stopReading()
            try await rude.send { buffer in
                for index in 0..<UInt64(100) {
                    RequestHeader(type: .read, cookie: NBDCookie(index), offset: index % (exportSize / length) * length, length: length)
                        .encode(into: &buffer)
                }
            }
            floods.append(rude)
        }
        return floods
    }

    /// A good client still gets exact data.
    func expectServed(_ socket: String) async throws {
        let export = try await NBDExport.connect(to: NBDURI(socket: socket))
        let data = pattern(1 << 20, seed: 9)
        try await export.write(data, at: 3 << 20)
        #expect(try await export.read(at: 3 << 20, length: 1 << 20) == data)
        await export.disconnect()
    }

    @Test func aClientThatReadsNoRepliesMakesTheServerPerformOnlyWhatItsBoundHolds() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let backend = TestBackend(size: 64 << 20)
        let (server, socket) = try await start(folder, backend) {
            $0.maximumPayload = 1 << 20
            $0.maximumBufferedBytes = 4 << 20
        }
        let rude = try await RawClient(socket: socket)
        try await rude.enterTransmission()
        try await rude.stopReading()
        // 500 READs of 1 MiB (500 MiB of replies), sent in 14 KB, never read.
        try await rude.send { buffer in
            for index in 0..<500 {
                RequestHeader(type: .read, cookie: NBDCookie(UInt64(index)), offset: UInt64(index % 64) << 20, length: 1 << 20).encode(
                    into: &buffer
                )
            }
        }
        // The server fills its bound (4 MiB of replies)...
        try await waitUntil("4 reads performed", seen: "\(backend.reads.withLockedValue { $0 })") {
            backend.reads.withLockedValue { $0 } >= 4
        }
        // ... and then performs no more, however long the client leaves them unread. A pause on
        // purpose: what is checked is that nothing more happens.
        try await Task.sleep(for: .seconds(1))
        // What the bound holds, plus what the kernel's socket buffers took: not 500.
        let performed = backend.reads.withLockedValue { $0 }
        #expect(performed <= 16, "\(performed) reads performed")
        try await expectServed(socket)
        await rude.close()
        try await waitUntil("the server to close the connection", seen: "\(server.connections.count) open") {
            server.connections.count == 0
        }
        // The client has gone: what it left unread is dropped, not performed.
        #expect(backend.reads.withLockedValue { $0 } <= performed + 5)
        try await expectServed(socket)
        await server.shutdown()
    }

    /// Clients that send READs and read no reply hold, all together, no more than the server's
    /// memory budget (without it, each would hold its own bound: 12 of 16 MiB here), and a
    /// client with small requests is served beside them from its guaranteed part.
    @Test func readFloodsTogetherStayWithinTheMemoryBudget() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let backend = TestBackend(size: 64 << 20)
        // 32 MiB for 16 connections: 1 MiB each of their own, 16 MiB shared.
        let (server, socket) = try await start(folder, backend) {
            $0.maximumPayload = 1 << 20
            $0.maximumBufferedBytes = 16 << 20
            $0.maximumConnections = 16
            $0.memoryBudget = 32 << 20
        }
        // 12 clients, each 100 READs of 1 MiB, never read.
        let floods = try await readFloods(socket, clients: 12, length: 1 << 20, exportSize: 64 << 20)
        // The floods fill what they may: their own parts, and the shared half.
        try await waitUntil("the floods to fill the budget", seen: "\(backend.reads.withLockedValue { $0 }) reads") {
            backend.reads.withLockedValue { $0 } >= 24
        }
        // A pause on purpose: what is checked is that no more is taken however long they wait.
        try await Task.sleep(for: .seconds(1))
        let performed = backend.reads.withLockedValue { $0 }
        // What the budget holds, plus the replies the kernel's socket buffers took; without the
        // budget, 12 × 17.
        #expect(performed <= 60, "\(performed) reads performed")
        #expect(server.memoryBudget.peak <= (32 << 20) + (64 << 10), "\(server.memoryBudget.peak) bytes held at the peak")
        try await expectServed(socket)
        for rude in floods { await rude.close() }
        // Everything they held goes back to the budget as their requests end.
        try await waitUntil("the budget to be empty", seen: "\(server.memoryBudget.total) bytes held") { server.memoryBudget.total == 0 }
        await server.shutdown()
    }

    /// The flood of the issue, against `nbd serve`: 32 clients each send 100 READs of 32 MiB
    /// and read no reply. With `--memory-budget 256M` the server's peak resident memory stays
    /// near the budget (each client alone may hold 96 MiB: 3 GiB without it), and `nbd info`
    /// is served beside them.
    @Test func serveHoldsReadFloodsWithinItsMemoryBudget() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let socket = folder.path("budget.sock")
        let server = try await folder.start(
            nbdTool,
            ["serve", "--memory", "1G", "--memory-budget", "256M", "--socket", socket],
            waitFor: socket
        )
        let floods = try await readFloods(socket, clients: 32, length: 32 << 20, exportSize: 1 << 30)
        let peak = { () -> Int in
            let status = (try? String(contentsOfFile: "/proc/\(server.processIdentifier)/status", encoding: .utf8)) ?? ""
            let line = status.split(separator: "\n").first { $0.hasPrefix("VmHWM:") } ?? ""
            return Int(line.split(separator: " ").dropFirst().first ?? "0").map { $0 << 10 } ?? 0
        }
        // The budget fills (its shared half holds four such replies, the rest wait).
        try await waitUntil("the server to hold the shared half", seen: "a peak of \(peak() >> 20) MiB") { peak() >= 128 << 20 }
        // A pause on purpose: what is checked is that no more is taken however long they wait.
        try await Task.sleep(for: .seconds(2))
        let info = try runNBD(["info", "--size", NBDURI(socket: socket).description])
        #expect(info.output == "1073741824\n", "\(info.error)")
        #expect(peak() <= 400 << 20, "the server's resident memory peaked at \(peak() >> 20) MiB")
        for rude in floods { await rude.close() }
    }

    @Test func aClientThatReadsNothingForTheDeadlineIsClosed() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let (server, socket) = try await start(folder, MemoryBackend(size: 64 << 20)) {
            $0.maximumPayload = 1 << 20
            $0.maximumBufferedBytes = 2 << 20
            $0.replyStallTimeout = .seconds(1)
        }
        let rude = try await RawClient(socket: socket)
        try await rude.enterTransmission()
        try await rude.stopReading()
        try await rude.send { buffer in
            for index in 0..<64 {
                RequestHeader(type: .read, cookie: NBDCookie(UInt64(index)), offset: UInt64(index) << 20, length: 1 << 20).encode(
                    into: &buffer
                )
            }
        }
        // An idle client is kept; one that leaves its replies unread past the deadline is not.
        let idle = try await RawClient(socket: socket)
        try await idle.enterTransmission()
        let rudeClosed = try await rude.isClosedByServer()
        #expect(rudeClosed)
        // Idle past the same deadline, and still served. A pause on purpose: what is checked is
        // that the idle client is not closed.
        try await Task.sleep(for: .seconds(1))
        #expect(idle.channel.isActive)
        try await expectServed(socket)
        await idle.close()
        await server.shutdown()
    }

    @Test func silentConnectionsNeverLockOutClientsThatNegotiate() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let (server, socket) = try await start(folder, MemoryBackend(size: 64 << 20)) {
            $0.maximumConnections = 16
            $0.maximumNegotiatingConnections = 4
            $0.handshakeTimeout = .seconds(5)
        }
        var silent: [RawClient] = []
        var connectedAt: [ContinuousClock.Instant] = []
        for _ in 0..<12 {
            silent.append(try await RawClient(socket: socket))
            connectedAt.append(.now)
        }
        // Beyond four negotiating, the oldest made room: eight are closed already, and the last
        // four are not, unless their own deadline passed meanwhile (a very busy machine).
        try await waitUntil("the first eight to be closed", seen: "\(silent.map(\.channel.isActive))") {
            silent.prefix(8).allSatisfy { !$0.channel.isActive }
        }
        let now = ContinuousClock.now
        for index in 8..<12 {
            #expect(silent[index].channel.isActive || now - connectedAt[index] >= .seconds(5), "client \(index) was evicted")
        }
        try await expectServed(socket)
        // The last four are closed by the handshake deadline.
        try await waitUntil("the last four to be closed by the handshake deadline", seen: "\(silent.map(\.channel.isActive))") {
            silent.allSatisfy { !$0.channel.isActive }
        }
        try await expectServed(socket)
        await server.shutdown()
    }
}

extension ServerUnderAbuseTests {
    @Test func serveClosesSilentClientsAfterItsHandshakeTimeout() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let socket = folder.path("serve.sock")
        let process = try await folder.start(
            nbdTool,
            ["serve", "--memory", "16M", "--socket", socket, "--handshake-timeout", "0.5", "--connection-buffer", "8M"],
            waitFor: socket
        )
        let silent = try await RawClient(socket: socket)
        #expect(try await silent.isClosedByServer())
        try await expectServed(socket)
        kill(process.processIdentifier, SIGTERM)
        try await process.exited()
        #expect(process.terminationStatus == 0)
    }

    @Test(arguments: [
        ["--handshake-timeout", "0"], ["--handshake-timeout", "soon"], ["--connection-buffer", "4K"], ["--memory-budget", "63M"],
    ])
    func badServeLimitsGiveOneLineAndExitOne(arguments: [String]) throws {
        let result = try runNBD(["serve", "--memory", "1M", "--socket", "/nonexistent/x.sock"] + arguments)
        #expect(result.status != 0)
        #expect(result.error.split(separator: "\n").count <= 2, "\(result.error)")
        #expect(result.error.contains(arguments[0]), "\(result.error)")
    }
}
