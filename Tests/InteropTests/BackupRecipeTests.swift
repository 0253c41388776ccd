import Foundation
import NBD
import NBDCopy
import Testing

/// The README's backup recipe (Snippets/Backup.swift) through the library against qemu-nbd: a
/// full copy with its blkhash, writes after `qemu-img bitmap --add`, then an incremental,
/// journalled copy of the dirty bitmap onto the full copy, verified against the export's
/// blkhash and against what nbdcopy reads.
@Suite("NBDCopy: the backup recipe against qemu-nbd", .serialized)
struct BackupRecipeTests {
    @Test func anIncrementalBackupIsVerifiedByItsBlockHash() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let image = try QemuBitmapImage(server)
        let backup = server.path("backup.raw")

        // Last night's full copy, with the export's blkhash from the copy itself.
        let full = try await image.serveForFullCopy()
        let fullSource = try await NBDEndpoint.open(full.uri)
        var options = CopyOptions()
        options.flush = true
        options.blockHash = .default
        let first = try await copy(from: fullSource, to: FileEndpoint.destination(backup, size: fullSource.size), options: options)
        await fullSource.close()
        let firstHash = try #require(first.blockHash)
        #expect(try await verify(FileEndpoint.source(backup), matches: firstHash))

        // A bitmap, then the guest's writes: new data, and zeroes over old data.
        try await image.dirty(after: full.process)
        let (uri, trace) = try await image.serveWithBitmap()

        // The recipe.
        let changes = try await NBDEndpoint.open(uri, bitmap: .dirtyBitmap("b0"))
        var incremental = CopyOptions()
        incremental.flush = true
        incremental.journal = .init(path: backup + ".journal", source: "\(uri)", destination: backup, sourceState: "backup-job-1")
        let report = try await copy(from: changes, to: FileEndpoint.destination(backup, size: changes.size), options: incremental)
        await changes.close()
        // The 1 MiB of new data is read; the zeroed half MiB is zero in block status.
        #expect(qemuBytesSent(trace) == 1 << 20)
        #expect(report.bytes == 64 << 20 && report.skippedBytes == (64 << 20) - (3 << 19))
        #expect(!FileManager.default.fileExists(atPath: backup + ".journal"))
        let export = try await NBDEndpoint.open(uri)
        let expected = try #require(try await checksum(of: export))
        #expect(expected != firstHash)
        #expect(try await verify(FileEndpoint.source(backup), matches: expected))
        // The export no longer has last night's blkhash: the first 16 MiB region differs.
        await #expect {
            try await verify(export, matches: firstHash)
        } throws: { error in
            (error as? NBDCopyError)?.code == .verificationFailed && "\(error)".hasSuffix("in bytes 0..<16777216")
        }
        await export.close()
        // Not only the blkhash: the bytes nbdcopy reads from the export.
        _ = try server.run("nbdcopy", [uri.description, server.path("expected.raw")])
        #expect(try Data(contentsOf: URL(fileURLWithPath: backup)) == Data(contentsOf: URL(fileURLWithPath: server.path("expected.raw"))))
    }
}
