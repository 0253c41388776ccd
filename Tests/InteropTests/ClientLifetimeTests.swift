import Foundation
import NBD
import NBDCopy
import NIOConcurrencyHelpers
import TestSupport
import Testing

/// What an `NBDClient` starts ends with it: its events when `run()` returns, and the listener
/// of an `NBDEndpoint` when the endpoint is closed.
@Suite("Client lifetimes", .serialized)
struct ClientLifetimeTests {
    /// A reference that does not keep its object alive, handed between tasks by the test.
    final class Weak: @unchecked Sendable {
        weak var object: AnyObject?
    }

    final class Sentinel: Sendable {}

    @Test func theEventsEndWhenRunReturns() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(["memory", "16M"])
        let client = NBDClient(uri)
        let ended = NIOLockedValueBox(false)
        let events = Task { () -> [NBDClientEvent] in
            var seen: [NBDClientEvent] = []
            for await event in client.events { seen.append(event) }
            ended.withLockedValue { $0 = true }
            return seen
        }
        let running = Task { try await client.run() }
        #expect(try await client.size == 16 << 20)
        running.cancel()
        try await running.value
        // The reader's loop ends: nothing more will come.
        try await waitUntil("the events to end after run() returned") { ended.withLockedValue { $0 } }
        let seen = await events.value
        #expect(seen.first == .connected(connection: 0), "\(seen)")
    }

    @Test func closingAnEndpointEndsItsEventListener() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(["memory", "16M"])
        let listener = Weak()
        do {
            let sentinel = Sentinel()
            listener.object = sentinel
            let endpoint = try await NBDEndpoint.open(uri, connections: 1) { _ in _ = sentinel }
            await endpoint.close()
        }
        try await waitUntil("the closed endpoint's event listener to let go of its handler") { listener.object == nil }
    }
}
