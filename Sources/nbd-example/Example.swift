// A walk through the client API, phase by phase, against a real server over a real socket.
//
//     swift run nbd-example                      # starts the built-in server in this process
//     swift run nbd-example nbd://host/export    # or any writable server you name
//
// Exits non-zero if any step fails.
import Foundation
import NBD
import NBDServer
import NIOCore

@main
struct Example {
    static func main() async {
        do {
            try await run()
            print("all steps passed")
        } catch {
            try? FileHandle.standardError.write(contentsOf: Data("nbd-example: \(error)\n".utf8))
            exit(1)
        }
    }

    static func run() async throws {
        var server: NBDServer?
        let uri: NBDURI
        if CommandLine.arguments.count > 1 {
            uri = try NBDURI(CommandLine.arguments[1])
        } else {
            let socket = FileManager.default.temporaryDirectory.appendingPathComponent("nbd-example-\(getpid()).sock").path
            let export = NBDServerExport(name: "demo", description: "a 64 MiB disk in memory", backend: MemoryBackend(size: 64 << 20))
            server = try await NBDServer.start(exports: [export], on: .unix(path: socket))
            uri = NBDURI(socket: socket, exportName: "demo")
            print("started the built-in server with a 64 MiB memory export at \(uri)")
        }

        // 1. Dial and handshake: the connection is in the negotiation phase.
        let connection = try await NBDConnection.connect(to: uri)
        print("1. handshake done, the server offers \(connection.serverFlags)")

        // 2. Negotiate: list, describe, agree on the newest format both speak, ask for block status.
        print("2. the server lists these exports:")
        for listing in try await connection.list() {
            let name = listing.name.isEmpty ? "(default)" : listing.name
            print("     \(name)\(listing.description.isEmpty ? "" : ": \(listing.description)")")
        }
        let info = try await connection.info(uri.exportName)
        let exportName = uri.exportName.isEmpty ? "the default export" : uri.exportName
        print("   \(exportName) has \(info.size) bytes, \(info.isReadOnly ? "read-only" : "writable")")
        print("   block sizes: \(info.blockSizes)")
        // Extended headers (64-bit lengths) where the server has them, else structured replies.
        let format = try await connection.negotiateFormat()
        let formatName =
            switch format {
            case .extended: "extended headers"
            case .structured: "structured replies"
            case .simple: "simple replies only"
            }
        let contexts = try await connection.setMetaContexts(for: uri.exportName, queries: ["base:allocation"])
        let contextNames = contexts.isEmpty ? "none" : contexts.map(\.name).joined(separator: ", ")
        print("   \(formatName), metadata contexts: \(contextNames)")

        // 3. GO: the connection becomes an export in the transmission phase.
        let export = try await connection.go(uri.exportName)
        print("3. in transmission, export flags \(export.info.flags)")

        // 4. Transmit: write, read back, compare; zero, trim, block status, flush.
        var data = ByteBuffer()
        for i in 0..<(1 << 20) { data.writeInteger(UInt8(truncatingIfNeeded: i &* 31 &+ 7)) }
        try await export.write(data, at: 4096)
        let back = try await export.read(at: 4096, length: UInt64(data.readableBytes))
        guard back == data else { throw ExampleError("read back differs from what was written") }
        print("4. wrote 1 MiB at offset 4096 and read it back: identical")
        if export.info.canZero { try await export.writeZeroes(at: 4096, length: 65536) }
        if export.info.canTrim { try await export.trim(at: 1 << 20, length: 65536) }
        if !export.metaContexts.isEmpty {
            print("   the first 4 MiB, by block status:")
            for try await extent in export.extents(in: 0..<min(export.size, 4 << 20)) { print("     \(extent)") }
        }
        if export.info.canFlush { try await export.flush() }

        // 5. Disconnect: requests in flight drain, NBD_CMD_DISC, close.
        await export.disconnect()
        print("5. disconnected")
        if let server {
            await server.shutdown()
            if case .unix(let path) = uri.transport { try? FileManager.default.removeItem(atPath: path) }
        }
    }
}

struct ExampleError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
