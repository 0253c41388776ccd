import Foundation
import NBD
import NIOCore
import NIOPosix
import Testing

/// TCP connections that never complete: a listener whose backlog is full and that accepts
/// nothing, so the kernel drops further SYNs.
@Suite("Connecting")
struct ConnectCancellationTests {
    /// Runs `body` with the port of such a listener.
    func withUnansweringPort(_ body: (Int) async throws -> Void) async throws {
        let listener = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.backlog, value: 1)
            .serverChannelOption(.autoRead, value: false)
            .bind(host: "127.0.0.1", port: 0).get()
        let port = try #require(listener.localAddress?.port)
        // Fill the backlog with connections nobody accepts.
        var fillers: [Channel] = []
        for _ in 0..<4 {
            let bootstrap = ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton).connectTimeout(.milliseconds(200))
            if let channel = try? await bootstrap.connect(host: "127.0.0.1", port: port).get() { fillers.append(channel) }
        }
        do {
            try await body(port)
        } catch {
            for channel in fillers { try? await channel.close() }
            try await listener.close()
            throw error
        }
        for channel in fillers { try? await channel.close() }
        try await listener.close()
    }

    @Test func cancellingTheTaskStopsATCPConnectInProgress() async throws {
        try await withUnansweringPort { port in
            var configuration = NBDClientConfiguration()
            configuration.connectTimeout = .seconds(60)
            let attempt = Task {
                _ = try await NBDConnection.connect(to: .tcp(host: "127.0.0.1", port: port), configuration: configuration)
            }
            // A pause on purpose, to cancel a connect under way (one not yet begun ends the same).
            try await Task.sleep(for: .milliseconds(300))
            let cancelledAt = ContinuousClock.now
            attempt.cancel()
            let result = await attempt.result
            let waited = ContinuousClock.now - cancelledAt
            #expect(throws: CancellationError.self) { try result.get() }
            // Promptly, with room for a busy machine: not the 60 s of the connect timeout.
            #expect(waited < .seconds(10), "the connect went on \(waited) after the cancellation")
        }
    }

    @Test func aConnectThatIsNeverAnsweredTimesOut() async throws {
        try await withUnansweringPort { port in
            var configuration = NBDClientConfiguration()
            configuration.connectTimeout = .milliseconds(500)
            await #expect(
                performing: { _ = try await NBDConnection.connect(to: .tcp(host: "127.0.0.1", port: port), configuration: configuration) },
                throws: { error in
                    guard let error = error as? NBDError else { return false }
                    return error.code == .connectFailed && error.message == "cannot connect to 127.0.0.1:\(port): no answer within 0.5 s"
                }
            )
        }
    }
}
