// The README's and docs/Library.md's one-call forms: connect from an NBD URI, or use an export for a scope.
// snippet.show
import NBD

func oneCall() async throws {
    let export = try await NBDExport.connect(to: "nbd+unix:///disk?socket=/tmp/nbd.sock")
    print(export.size)
    await export.disconnect()

    try await NBDExport.withExport(NBDURI("nbd://localhost/disk")) { export in
        print(export.info)  // ... always disconnected afterwards, even when this throws
    }
}
