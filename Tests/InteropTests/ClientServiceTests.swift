import Foundation
import Logging
import NBD
import NIOCore
import ServiceLifecycle
import TestSupport
import Testing

/// `NBDClient` as a swift-service-lifecycle `Service`, and its open timeout, against nbdkit.
extension ClientReconnectTests {
    /// A graceful shutdown of the group flushes what the client's replay log holds: the
    /// write-back server killed right after the client has gone holds every write on disk
    /// (cancelled instead, the client disconnects without a flush, and the kill loses them).
    @Test(arguments: [1, 4])
    func aGracefulShutdownFlushesWhatTheServerWasHolding(connections: Int) async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let (file, nbdkit, data, seed, client) = try await writeBackJob(server, connections: connections, rate: "64M")
        var settings = ServiceGroupConfiguration(services: [.init(service: client)], logger: Logger(label: "test"))
        // Far beyond what the drain takes: a client that ignored the graceful shutdown would be
        // cancelled, and fail below.
        settings.maximumGracefulShutdownDuration = .seconds(30)
        let group = ServiceGroup(configuration: settings)
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            try await writeAll(data, to: client)
            #expect(client.replays == 0)
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
        await #expect { try await client.read(at: 0, length: 4096) } throws: { error in
            (error as? NBDError)?.message.contains("shut") == true
        }
        try await nbdkit.kill()
        #expect(try Data(contentsOf: URL(fileURLWithPath: file)) == Data(data.readableBytesView), "seed \(seed): writes lost")
    }

    /// With an open timeout the client waits for a server that starts after it (qemu's
    /// `open-timeout`); without one it fails at once, saying nothing listens.
    @Test func theFirstConnectionWaitsForTheServerWithinTheOpenTimeout() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let socket = server.path("late.sock")
        var settings = configuration(connections: 1, reconnectDelay: .zero)
        let once = NBDClient(NBDURI(socket: socket), configuration: settings)
        let started = ContinuousClock.now
        await #expect { try await once.run() } throws: { ($0 as? NBDError)?.code == .connectFailed }
        #expect(ContinuousClock.now - started < .seconds(10), "one dial, not a wait")

        settings.openTimeout = .seconds(30)
        let patient = NBDClient(NBDURI(socket: socket), configuration: settings)
        let nbdkit = Restartable(server, "nbdkit", socket: socket, ["--foreground", "--unix", socket, "memory", "1M"])
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await patient.run() }
            // On purpose: the server starts a while after the client, which keeps dialling.
            try await Task.sleep(for: .seconds(1))
            try await nbdkit.start()
            #expect(try await patient.size == 1 << 20)
            tasks.cancelAll()
        }
        try await nbdkit.kill()
    }
}
