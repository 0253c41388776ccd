// The README's NBDClient examples: scoped, and owned by a task group.
import NBD
import NIOCore

// snippet.scoped
func checksumOfFirstMegabyte() async throws -> Int {
    try await NBDClient.withClient("nbd+unix:///disk?socket=/tmp/nbd.sock") { client in
        let data = try await client.read(at: 0, length: 1 << 20)
        return data.readableBytesView.reduce(0) { $0 &+ Int($1) }
    }
}
// snippet.end

// snippet.run
func backUp(to target: ByteBuffer) async throws {
    var configuration = NBDClient.Configuration()
    configuration.connections = 4  // when the server allows multi-conn
    configuration.reconnectDelay = .seconds(30)  // ride out a restart of up to 30 s
    let client = try NBDClient("nbd://backup.example.com/disk", configuration: configuration)
    try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask { try await client.run() }  // owns the connections until cancelled
        group.addTask {
            for await event in client.events { print(event) }  // lost, reconnected, ...
        }
        try await client.write(target, at: 0)
        try await client.flush()  // durable on the server, whatever connection wrote it
        group.cancelAll()  // disconnects softly once requests in flight are answered
    }
}
// snippet.end
