import Foundation
import NBD
import NIOConcurrencyHelpers
import NIOCore
import TestSupport
import Testing

/// `NBDClient` against real servers: several connections to one export, and servers killed
/// with SIGKILL and started again on the same socket in the middle of the work; every result
/// is compared by content.
@Suite("NBDClient: connections and restarts", .serialized)
struct ClientReconnectTests {
    static let size = 16 << 20

    /// A server process that can be killed and started again with the same arguments, on a
    /// Unix socket or a loopback TCP port (the kernel's pick at the first start, then the same).
    final class Restartable: @unchecked Sendable {
        let server: ServerProcess
        let tool: String
        /// The socket's path; empty on TCP.
        let socket: String
        /// The command line for a TCP port; nil on a Unix socket.
        private let tcpArguments: ((Int) -> [String])?
        private(set) var port: Int?
        var arguments: [String]
        var process: Process?

        init(_ server: ServerProcess, _ tool: String, socket: String, _ arguments: [String]) {
            self.server = server
            self.tool = tool
            self.socket = socket
            self.tcpArguments = nil
            self.arguments = arguments
        }

        init(_ server: ServerProcess, _ tool: String, tcp arguments: @escaping (Int) -> [String]) {
            self.server = server
            self.tool = tool
            self.socket = ""
            self.tcpArguments = arguments
            self.arguments = []
        }

        func start() async throws {
            guard let tcpArguments else {
                process = try await server.start(tool, arguments, waitFor: socket)
                return
            }
            guard let port else {
                (process, port) = try await server.startOnFreePort(tool, tcpArguments)
                return
            }
            process = try await server.start(tool, tcpArguments(port))
            try await server.waitUntilListening(port: port, process: process!)
        }

        /// SIGKILL, as a crash or a pulled plug: no goodbye on any connection.
        func kill() async throws {
            guard let process else { return }
            Foundation.kill(process.processIdentifier, SIGKILL)
            try await process.exited()
            if tcpArguments == nil { try? FileManager.default.removeItem(atPath: socket) }
        }

        /// Killed, then started again after `pause`: the server is away that long, on purpose.
        func restart(after pause: Duration) async throws {
            try await kill()
            try await Task.sleep(for: pause)
            try await start()
        }
    }

    /// The events of a client, collected until the test is done with them.
    final class EventLog: Sendable {
        private let events = NIOLockedValueBox<[NBDClientEvent]>([])
        private let task: Task<Void, Never>

        init(_ client: NBDClient) {
            let events = self.events
            task = Task { for await event in client.events { events.withLockedValue { $0.append(event) } } }
        }

        var all: [NBDClientEvent] { events.withLockedValue { $0 } }
        func count(_ matching: (NBDClientEvent) -> Bool) -> Int { all.filter(matching).count }
        deinit { task.cancel() }
    }

    /// Waits until `count` connections are up, so that the next kill hits live connections,
    /// not a dial.
    func connected(_ client: NBDClient, _ count: Int) async throws {
        try await waitUntil("\(count) connections up", seen: "\(client.connectionCount)") { client.connectionCount >= count }
    }

    /// The 256 KiB pieces ``writeAll(_:to:pieces:)`` and ``readAll(from:size:pieces:)`` have
    /// done, to wait until a job is under way.
    final class Pieces: Sendable {
        private let done = NIOLockedValueBox(0)
        var count: Int { done.withLockedValue { $0 } }
        func add() { done.withLockedValue { $0 += 1 } }

        /// Waits until `more` pieces are done from now: the job goes on, over the connections
        /// up now, so that a kill lands in the middle of it.
        func progressed(by more: Int = 2) async throws {
            let target = count + more
            try await waitUntil("\(more) more pieces of the job done", seen: "\(self.count - target + more) done") { count >= target }
        }
    }

    func configuration(connections: Int, reconnectDelay: Duration) -> NBDClient.Configuration {
        var configuration = NBDClient.Configuration()
        configuration.connections = connections
        configuration.reconnectDelay = reconnectDelay
        configuration.connection.uriMayReadLocalFiles = true
        return configuration
    }

    /// Writes `data` in 256 KiB pieces from 8 tasks.
    func writeAll(_ data: ByteBuffer, to client: NBDClient, pieces: Pieces? = nil) async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            for task in 0..<8 {
                group.addTask {
                    for piece in stride(from: task, to: data.readableBytes / (256 << 10), by: 8) {
                        let offset = piece * (256 << 10)
                        try await client.write(data.getSlice(at: offset, length: 256 << 10)!, at: UInt64(offset))
                        pieces?.add()
                    }
                }
            }
            try await group.waitForAll()
        }
    }

    /// Reads the whole export in 256 KiB pieces from 8 tasks.
    func readAll(from client: NBDClient, size: Int, pieces: Pieces? = nil) async throws -> ByteBuffer {
        let pieces = try await withThrowingTaskGroup(of: [(Int, ByteBuffer)].self) { group in
            for task in 0..<8 {
                group.addTask {
                    var read: [(Int, ByteBuffer)] = []
                    for piece in stride(from: task, to: size / (256 << 10), by: 8) {
                        read.append((piece, try await client.read(at: UInt64(piece * (256 << 10)), length: 256 << 10)))
                        pieces?.add()
                    }
                    return read
                }
            }
            var all: [(Int, ByteBuffer)] = []
            for try await part in group { all += part }
            return all
        }
        var whole = ByteBuffer()
        for (_, piece) in pieces.sorted(by: { $0.0 < $1.0 }) { whole.writeImmutableBuffer(piece) }
        return whole
    }

    func zeroFile(_ path: String, size: Int) throws {
        try Data(count: size).write(to: URL(fileURLWithPath: path))
    }

    /// nbdkit's file plugin on `name` (a file of zeroes unless it exists), slowed to `rate`
    /// bits per second, started on `name`.sock: the data outlives the server. With
    /// `writeBack`, through nbdkit's cache filter in write-back mode: what it answered lives
    /// in its memory until a flush, and a kill loses it.
    func slowFileServer(
        _ server: ServerProcess,
        _ name: String,
        rate: String,
        writeBack: Bool = false
    ) async throws -> (file: String, nbdkit: Restartable) {
        let file = server.path(name)
        if !FileManager.default.fileExists(atPath: file) { try zeroFile(file, size: Self.size) }
        let socket = server.path("\(name).sock")
        let cache = writeBack ? ["--filter=cache"] : []
        let nbdkit = Restartable(
            server,
            "nbdkit",
            socket: socket,
            ["--foreground", "--unix", socket, "--filter=rate"] + cache + ["file", file, "rate=\(rate)"]
                + (writeBack ? ["cache=writeback"] : [])
        )
        try await nbdkit.start()
        return (file, nbdkit)
    }

    /// nbdkit's file plugin (the data outlives the server), slowed by its rate filter so that
    /// the kills land in the middle: 1 and 4 connections, two restarts in one job, the
    /// destination side (writes) and the source side (reads).
    @Test(arguments: [1, 4])
    func nbdkitKilledTwiceMidJob(connections: Int) async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let (file, nbdkit) = try await slowFileServer(server, "disk.raw", rate: "32M")
        let socket = nbdkit.socket
        let data = pattern(Self.size, seed: 21)
        let client = NBDClient(NBDURI(socket: socket), configuration: configuration(connections: connections, reconnectDelay: .seconds(20)))
        let events = EventLog(client)
        let pieces = Pieces()
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await client.run() }
            async let writing: Void = writeAll(data, to: client, pieces: pieces)
            for _ in 0..<2 {
                try await connected(client, connections)
                try await pieces.progressed()
                try await nbdkit.restart(after: .seconds(1))
            }
            try await writing
            try await client.flush()
            let writeReplays = client.replays
            #expect(writeReplays > 0)
            // The source side: reads across two more restarts, each read held 50 ms in the
            // server, so that reads are on the wire when it is killed (a kill between the
            // replies of a fast read would leave nothing to send again).
            nbdkit.arguments.insert("--filter=delay", at: nbdkit.arguments.firstIndex(of: "--filter=rate")! + 1)
            nbdkit.arguments.append("rdelay=50ms")
            try await nbdkit.restart(after: .zero)
            async let reading = readAll(from: client, size: Self.size, pieces: pieces)
            for _ in 0..<2 {
                try await connected(client, connections)
                try await pieces.progressed()
                try await nbdkit.restart(after: .seconds(1))
            }
            #expect(try await reading == data)
            #expect(client.replays > writeReplays)
            // The last kill may land after the last read: its reconnect follows all the same.
            try await connected(client, connections)
            group.cancelAll()
        }
        #expect(try Data(contentsOf: URL(fileURLWithPath: file)) == Data(data.readableBytesView))
        #expect(events.count { if case .lost = $0 { true } else { false } } >= 4)
        #expect(events.count { if case .reconnected = $0 { true } else { false } } >= 4)
        #expect(events.count { if case .gaveUp = $0 { true } else { false } } == 0)
    }

    /// The same against qemu-nbd and against our own `nbd serve`, each killed and started
    /// again on the same socket while the client writes, then while it reads.
    @Test(arguments: ["qemu-nbd", "nbd serve"])
    func otherServersKilledMidJob(which: String) async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let file = server.path("disk.raw")
        try zeroFile(file, size: Self.size)
        let socket = server.path("server.sock")
        let restartable =
            which == "qemu-nbd"
            ? Restartable(server, "qemu-nbd", socket: socket, ["-k", socket, "-t", "-f", "raw", "-e", "4", "--cache=none", file])
            : Restartable(server, nbdTool, socket: socket, ["serve", file, "--socket", socket])
        try await restartable.start()
        let data = pattern(Self.size, seed: 22)
        let client = NBDClient(NBDURI(socket: socket), configuration: configuration(connections: 4, reconnectDelay: .seconds(20)))
        let events = EventLog(client)
        let pieces = Pieces()
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await client.run() }
            // Written twice: the kill lands in the second pass whatever the server's speed.
            try await writeAll(pattern(Self.size, seed: 1), to: client)
            async let writing: Void = writeAll(data, to: client, pieces: pieces)
            try await pieces.progressed()
            try await restartable.restart(after: .milliseconds(500))
            try await writing
            try await client.flush()
            let writeReplays = client.replays
            #expect(writeReplays > 0)
            // Killed again under reads.
            async let reading = readAll(from: client, size: Self.size, pieces: pieces)
            try await connected(client, 4)
            try await pieces.progressed()
            try await restartable.restart(after: .milliseconds(500))
            #expect(try await reading == data)
            #expect(client.replays > writeReplays)
            group.cancelAll()
        }
        #expect(try Data(contentsOf: URL(fileURLWithPath: file)) == Data(data.readableBytesView))
        #expect(events.count { if case .reconnected = $0 { true } else { false } } >= 2, "\(events.all)")
    }

    /// On a TCP port instead of a Unix socket: each server killed twice while the client
    /// writes through 4 connections and started again on the same port (nbdkit and qemu-nbd set
    /// SO_REUSEADDR, as does our server), with the data checked by content.
    @Test(arguments: ["nbdkit", "qemu-nbd", "nbd serve"])
    func serversKilledOnATCPPort(which: String) async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let file = server.path("disk.raw")
        try zeroFile(file, size: Self.size)
        let restartable = Restartable(server, which == "nbd serve" ? nbdTool : which) { port in
            switch which {
            case "nbdkit":
                ["--foreground", "-i", "127.0.0.1", "-p", "\(port)", "--filter=rate", "file", file, "rate=64M"]
            case "qemu-nbd": ["-b", "127.0.0.1", "-p", "\(port)", "-t", "-f", "raw", "-e", "4", "--cache=none", file]
            default: ["serve", file, "--bind", "127.0.0.1", "--port", "\(port)"]
            }
        }
        try await restartable.start()
        let uri = try NBDURI("nbd://127.0.0.1:\(restartable.port!)/")
        let data = pattern(Self.size, seed: 23)
        let client = NBDClient(uri, configuration: configuration(connections: 4, reconnectDelay: .seconds(20)))
        let events = EventLog(client)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await client.run() }
            try await connected(client, 4)
            #expect(client.connectionCount == 4)
            // Written until both kills have landed in a pass: the fast servers finish a pass
            // in well under a second, the rate-limited nbdkit in 2 s.
            let killed = NIOLockedValueBox(0)
            let pieces = Pieces()
            async let writing: Void = {
                var seed: UInt8 = 100
                while killed.withLockedValue({ $0 }) < 2 {
                    seed &+= 1  // only to vary the data: a fast server makes hundreds of passes
                    try await writeAll(pattern(Self.size, seed: seed), to: client, pieces: pieces)
                }
                try await writeAll(data, to: client)
            }()
            for _ in 0..<2 {
                try await connected(client, 4)
                try await pieces.progressed()
                try await restartable.restart(after: .milliseconds(700))
                killed.withLockedValue { $0 += 1 }
            }
            try await writing
            try await client.flush()
            #expect(client.replays > 0)
            #expect(try await readAll(from: client, size: Self.size) == data)
            group.cancelAll()
        }
        #expect(try Data(contentsOf: URL(fileURLWithPath: file)) == Data(data.readableBytesView))
        #expect(events.count { if case .reconnected = $0 { true } else { false } } >= 2, "\(events.all)")
        #expect(events.count { if case .gaveUp = $0 { true } else { false } } == 0)
    }

    /// Over TLS: the reconnect negotiates TLS again, through the same transport.
    @Test func tlsSurvivesARestart() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let certificates = try TLSTests().makeCertificates(server)
        let file = server.path("disk.raw")
        try zeroFile(file, size: Self.size)
        let socket = server.path("tls.sock")
        let nbdkit = Restartable(
            server,
            "nbdkit",
            socket: socket,
            [
                "--foreground", "--unix", socket, "--tls=require", "--tls-certificates", certificates.server,
                "--filter=rate", "file", file, "rate=32M",
            ]
        )
        try await nbdkit.start()
        let uri = try NBDURI("nbds+unix:///?socket=\(socket)&tls-certificates=\(certificates.client)&tls-hostname=localhost")
        let data = pattern(Self.size, seed: 23)
        let client = NBDClient(uri, configuration: configuration(connections: 4, reconnectDelay: .seconds(20)))
        let pieces = Pieces()
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await client.run() }
            async let writing: Void = writeAll(data, to: client, pieces: pieces)
            try await pieces.progressed()
            try await nbdkit.restart(after: .seconds(1))
            try await writing
            try await client.flush()
            #expect(client.replays > 0)
            group.cancelAll()
        }
        #expect(try Data(contentsOf: URL(fileURLWithPath: file)) == Data(data.readableBytesView))
    }

    /// A server that stays away: the job fails once the delay has passed (± 1 s), with an
    /// error that says how long it tried and why.
    @Test func aServerThatStaysAwayFailsAfterTheDelay() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let (_, nbdkit) = try await slowFileServer(server, "disk.raw", rate: "16M")
        let socket = nbdkit.socket
        let client = NBDClient(NBDURI(socket: socket), configuration: configuration(connections: 2, reconnectDelay: .seconds(3)))
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try? await client.run() }
            let pieces = Pieces()
            let writing = Task { try await writeAll(pattern(Self.size, seed: 24), to: client, pieces: pieces) }
            try await pieces.progressed(by: 1)
            try await nbdkit.kill()
            let killed = ContinuousClock.now
            await #expect {
                try await writing.value
            } throws: { error in
                guard let error = error as? NBDError else { return false }
                return error.code == .unavailable && error.message.contains("reconnecting for 3 s")
                    && error.message.contains("last cause")
            }
            let waited = ContinuousClock.now - killed
            // The 3 s delay, with room for a busy machine after it.
            #expect(waited > .seconds(2) && waited < .seconds(6), "\(waited)")
            group.cancelAll()
        }
    }

    /// A server that comes back with a smaller disk: a typed error, and nothing is written
    /// to it (its log shows no write).
    @Test func aServerThatComesBackSmallerIsRefused() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let (_, nbdkit) = try await slowFileServer(server, "disk.raw", rate: "16M")
        let socket = nbdkit.socket
        let log = server.path("after.log")
        let client = NBDClient(NBDURI(socket: socket), configuration: configuration(connections: 1, reconnectDelay: .seconds(10)))
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try? await client.run() }
            let pieces = Pieces()
            let writing = Task { try await writeAll(pattern(Self.size, seed: 25), to: client, pieces: pieces) }
            try await pieces.progressed(by: 1)
            try await nbdkit.kill()
            let smaller = server.path("smaller.raw")
            try zeroFile(smaller, size: Self.size / 2)
            nbdkit.arguments = ["--foreground", "--unix", socket, "--filter=log", "file", smaller, "logfile=\(log)"]
            try await nbdkit.start()
            await #expect {
                try await writing.value
            } throws: { error in
                guard let error = error as? NBDError else { return false }
                return error.code == .exportChanged && error.message.contains("8388608 bytes instead of 16777216")
            }
            group.cancelAll()
        }
        let logged = try String(contentsOfFile: log, encoding: .utf8)
        #expect(logged.contains("Connect"))
        #expect(!logged.contains(" Write "), "\(logged)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: server.path("smaller.raw"))) == Data(count: Self.size / 2))
    }

    /// Requests are spread over the four connections by what each has outstanding: nbdkit's
    /// log shows every connection serving a fair share.
    @Test func requestsAreSpreadOverTheConnections() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let log = server.path("spread.log")
        let uri = try await server.nbdkit(["--filter=log", "memory", "16M", "logfile=\(log)"])
        var configuration = configuration(connections: 4, reconnectDelay: .zero)
        configuration.connection.maximumRequestsInFlight = 4
        // Mixed sizes, in order: every fourth read is of 1 MiB, the others of 4 KiB, 16 at a
        // time. Round-robin would send every large one down the same connection.
        let sizes = (0..<64).map { $0 % 4 == 0 ? UInt64(1 << 20) : 4096 }
        try await NBDClient.withClient(uri, configuration: configuration) { (client: NBDClient) async throws in
            #expect(client.connectionCount == 4)
            try await withThrowingTaskGroup(of: Void.self) { group in
                for (index, size) in sizes.enumerated() {
                    if index >= 16 { try await group.next() }
                    group.addTask { _ = try await client.read(at: UInt64(index % 16) << 20, length: size) }
                }
                try await group.waitForAll()
            }
        }
        let lines = try String(contentsOfFile: log, encoding: .utf8).split(separator: "\n").filter { $0.contains(" Read id=") }
        var bytesPerConnection: [Substring: UInt64] = [:]
        for line in lines {
            let fields = line.split(separator: " ")
            guard let connection = fields.first(where: { $0.hasPrefix("connection=") }),
                let count = fields.first(where: { $0.hasPrefix("count=0x") }).flatMap({ UInt64($0.dropFirst(8), radix: 16) })
            else { continue }
            bytesPerConnection[connection, default: 0] += count
        }
        let total = sizes.reduce(0, +)
        #expect(lines.count == sizes.count)
        #expect(bytesPerConnection.values.reduce(0, +) == total, "\(bytesPerConnection)")
        #expect(bytesPerConnection.count == 4, "\(bytesPerConnection)")
        // By bytes outstanding, each carries a fair share of the bytes.
        #expect(bytesPerConnection.values.allSatisfy { $0 >= total / 8 }, "\(bytesPerConnection)")
    }

    /// qemu-nbd -e 2 advertises multi-conn and accepts two clients: the other two get no
    /// greeting, and the client goes on with two within the short deadline, saying so.
    @Test func aServerThatAcceptsFewerClients() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let file = server.path("disk.raw")
        try Data(pattern(Self.size, seed: 26).readableBytesView).write(to: URL(fileURLWithPath: file))
        let socket = server.path("qemu.sock")
        try await server.start("qemu-nbd", ["-k", socket, "-t", "-r", "-e", "2", "-f", "raw", file], waitFor: socket, probe: false)
        let client = NBDClient(NBDURI(socket: socket), configuration: configuration(connections: 4, reconnectDelay: .zero))
        let events = EventLog(client)
        let start = ContinuousClock.now
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await client.run() }
            // The first request waits for the extra connections, bounded by their 2 s deadline:
            // not by the 30 s negotiation timeout of the two that get no greeting.
            _ = try await client.read(at: 0, length: 4096)
            let waited = ContinuousClock.now - start
            #expect(waited < .seconds(10), "the first read waited \(waited)")
            let data = try await readAll(from: client, size: Self.size)
            #expect(data == pattern(Self.size, seed: 26))
            group.cancelAll()
        }
        let fewer = events.all.compactMap {
            if case .fewerConnections(let connected, let wanted, _) = $0 { (connected, wanted) } else { nil }
        }
        #expect(fewer.count == 1 && fewer[0] == (2, 4), "\(events.all)")
    }

    /// A frozen server: the request timeout ends the connection, the dials time out while it
    /// stays frozen, and the reconnect succeeds once it is thawed; the read returns its data.
    @Test func aFrozenServerIsReconnectedOnceThawed() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let file = server.path("disk.raw")
        try Data(pattern(1 << 20, seed: 27).readableBytesView).write(to: URL(fileURLWithPath: file))
        let socket = server.path("file.sock")
        let process = try await server.start(
            "nbdkit",
            ["--foreground", "--unix", socket, "file", file],
            waitFor: socket
        )
        var configuration = configuration(connections: 1, reconnectDelay: .seconds(20))
        configuration.connection.requestTimeout = .seconds(1)
        configuration.connection.negotiationTimeout = .seconds(1)
        try await NBDClient.withClient(NBDURI(socket: socket), configuration: configuration) { (client: NBDClient) async throws in
            let events = EventLog(client)
            // Frozen once the connection is up (frozen before, the first dial would time out
            // instead, and the read would go to a thawed server with nothing lost), and stopped
            // for sure before the read is sent.
            try await connected(client, 1)
            kill(process.processIdentifier, SIGSTOP)
            try await waitUntil("nbdkit to be stopped", seen: "state \(Self.state(of: process.processIdentifier))") {
                Self.state(of: process.processIdentifier) == "T"
            }
            // Frozen for 3 s on purpose: past the request timeout and a few dials.
            async let thawed: Void = {
                try await Task.sleep(for: .seconds(3))
                kill(process.processIdentifier, SIGCONT)
            }()
            #expect(try await client.read(at: 4096, length: 65536) == pattern(1 << 20, seed: 27).getSlice(at: 4096, length: 65536))
            try await thawed
            #expect(events.count { if case .lost(_, let cause) = $0 { cause.code == .timedOut } else { false } } == 1, "\(events.all)")
            #expect(events.count { if case .reconnected = $0 { true } else { false } } == 1, "\(events.all)")
            // The read that timed out went again.
            #expect(client.replays > 0)
        }
    }

    /// The state letter of /proc/PID/stat (R, S, T for stopped, ...).
    static func state(of pid: Int32) -> String {
        let stat = (try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)) ?? ""
        // "PID (COMMAND) STATE ...": the command may hold spaces, the state follows its ")".
        guard let close = stat.lastIndex(of: ")") else { return "?" }
        return stat[stat.index(after: close)...].split(separator: " ").first.map(String.init) ?? "?"
    }

    // MARK: The tool on top

    /// `nbd copy --reconnect-delay` between two nbdkit file servers, the destination and then
    /// the source killed and started again mid-copy, with --verify and --resume: the copy
    /// completes, the data is the source's, the journal is gone, and --progress=json said
    /// "reconnecting" while it waited.
    @Test func nbdCopyRidesOutRestartsOfBothSides() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let data = pattern(Self.size, seed: 28)
        try Data(data.readableBytesView).write(to: URL(fileURLWithPath: server.path("source.raw")))
        // 16 Mbit/s: the copy of 16 MiB takes about 8 s, so both kills land mid-copy (a build
        // that does not send requests again fails here).
        let (_, source) = try await slowFileServer(server, "source.raw", rate: "16M")
        let (destinationFile, destination) = try await slowFileServer(server, "destination.raw", rate: "16M")
        let journal = server.path("copy.journal")
        let copy = Process()
        copy.executableURL = URL(fileURLWithPath: nbdTool)
        copy.arguments = [
            "copy", "--reconnect-delay", "20", "--verify", "--resume", journal, "--progress=json",
            NBDURI(socket: source.socket).description, NBDURI(socket: destination.socket).description,
        ]
        let errors = Pipe()
        copy.standardError = errors
        copy.standardOutput = FileHandle.nullDevice
        try copy.run()
        // Each side killed once the copy has moved another MiB through its sockets.
        for side in [destination, source] {
            let start = bytesMoved(by: copy.processIdentifier)
            try await waitUntil("nbd copy to move 1 MiB more", seen: "\(bytesMoved(by: copy.processIdentifier))") {
                guard copy.isRunning else { throw InteropError("the copy ended before the kill") }
                let now = bytesMoved(by: copy.processIdentifier)
                return now.read - start.read >= 1 << 20 && now.written - start.written >= 1 << 20
            }
            try await side.restart(after: .seconds(1))
        }
        let said = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        try await copy.exited()
        #expect(copy.terminationStatus == 0, "\(said)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: destinationFile)) == Data(data.readableBytesView))
        #expect(!FileManager.default.fileExists(atPath: journal))
        #expect(said.contains("\"reconnecting\": true"), "\(said)")
        #expect(said.contains("nbd: verified"), "\(said)")
    }

    /// Without --reconnect-delay a killed server still fails the copy promptly, in one line.
    @Test func withoutADelayAKilledServerFailsTheCopyPromptly() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let (_, source) = try await slowFileServer(server, "source.raw", rate: "16M")
        let copy = Process()
        copy.executableURL = URL(fileURLWithPath: nbdTool)
        copy.arguments = ["copy", NBDURI(socket: source.socket).description, "null:"]
        let errors = Pipe()
        copy.standardError = errors
        try copy.run()
        try await waitUntil("nbd copy to read 1 MiB", seen: "\(bytesMoved(by: copy.processIdentifier))") {
            guard copy.isRunning else { throw InteropError("the copy ended before the kill") }
            return bytesMoved(by: copy.processIdentifier).read >= 1 << 20
        }
        try await source.kill()
        let killed = ContinuousClock.now
        let said = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        try await copy.exited()
        // Promptly: not after the tool's 60 s request timeout.
        #expect(ContinuousClock.now - killed < .seconds(5))
        #expect(copy.terminationStatus == 1)
        #expect(said.hasPrefix("nbd: ") && said.split(separator: "\n").count == 1, "\(said)")
    }
}
