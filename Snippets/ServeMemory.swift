// The README's server example: 1 GiB of memory served on loopback until the process ends.
// snippet.show
import NBDServer

func serve() async throws {
    let server = try await NBDServer.start(
        exports: [NBDServerExport(name: "disk", description: "scratch", backend: MemoryBackend(size: 1 << 30))],
        on: .tcp(host: "127.0.0.1", port: 10809)
    )
    await server.wait()
}
