import Foundation
import NBD
import NIOCore
import TestSupport
import Testing

/// Every promise of the export is checked again at each reconnection: a server back without
/// multi-conn gets one connection, and one back without the export ends the client at once.
extension ClientReconnectTests {
    @Test func aServerBackWithoutMultiConnGetsOneConnection() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let (file, nbdkit) = try await slowFileServer(server, "disk.raw", rate: "64M")
        let data = pattern(Self.size, seed: 41)
        let client = NBDClient(NBDURI(socket: nbdkit.socket), configuration: configuration(connections: 4, reconnectDelay: .seconds(20)))
        let events = EventLog(client)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await client.run() }
            try await connected(client, 4)
            #expect(try await client.info.canMultiConn)
            try await nbdkit.kill()
            nbdkit.arguments.insert("--filter=multi-conn", at: 3)
            nbdkit.arguments.append("multi-conn-mode=disable")
            try await nbdkit.start()
            try await writeAll(data, to: client)
            try await client.flush()
            #expect(client.connectionCount == 1)
            #expect(try await !client.info.canMultiConn)
            group.cancelAll()
        }
        let fewer = events.all.compactMap {
            if case .fewerConnections(let connected, _, let reason) = $0 { (connected, reason) } else { nil }
        }
        #expect(fewer.contains { $0 == (1, "the server no longer sets NBD_FLAG_CAN_MULTI_CONN") }, "\(events.all)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: file)) == Data(data.readableBytesView))
    }

    @Test func anExportGoneAfterARestartEndsTheClientAtOnce() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let file = server.path("disk.raw")
        try zeroFile(file, size: Self.size)
        let socket = server.path("qemu.sock")
        let qemu = Restartable(server, "qemu-nbd", socket: socket, ["-k", socket, "-t", "-f", "raw", "-x", "disk", file])
        try await qemu.start()
        let client = NBDClient(
            NBDURI(socket: socket, exportName: "disk"),
            configuration: configuration(connections: 1, reconnectDelay: .seconds(60))
        )
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try? await client.run() }
            try await client.write(pattern(65536, seed: 4), at: 0)
            try await qemu.kill()
            qemu.arguments = ["-k", socket, "-t", "-f", "raw", "-x", "other", file]
            try await qemu.start()
            let started = ContinuousClock.now
            await #expect {
                try await client.write(pattern(65536, seed: 5), at: 65536)
            } throws: { error in
                guard let error = error as? NBDError else { return false }
                return error.code == .exportChanged && error.message.contains("the export is gone after the restart")
            }
            // At once: not after the 60 s delay.
            #expect(ContinuousClock.now - started < .seconds(20))
            group.cancelAll()
        }
    }
}
