// The README's backup recipe: an incremental backup of a qemu dirty bitmap, resumable, then
// verified against the whole export's blkhash.
// snippet.show
import NBD
import NBDCopy

func incrementalBackup(job: String) async throws {
    // qemu-nbd -B backup-0 (or a fleecing export of a backup job): a view that holds still.
    let uri = try NBDURI("nbd+unix:///vda?socket=/run/vda-backup.sock")
    let backup = "/backups/vda.raw"  // last night's full copy
    // Only what the bitmap marks dirty is read, and written onto the full copy.
    let changes = try await NBDEndpoint.open(uri, bitmap: .dirtyBitmap("backup-0"))
    var options = CopyOptions()
    options.flush = true
    // `job` names the state being copied (the snapshot or backup job behind the export): a
    // resume under another name, or none, is refused rather than mixing two states.
    options.journal = .init(path: backup + ".journal", source: "\(uri)", destination: backup, sourceState: job)
    let report = try await copy(from: changes, to: try FileEndpoint.destination(backup, size: changes.size), options: options)
    await changes.close()
    // The whole export's blkhash; the backup must read back with it.
    let export = try await NBDEndpoint.open(uri)
    // Nil and false mean only that a stop cut them short (none is given here); a backup that
    // does not read back with the blkhash throws verificationFailed, naming where it differs.
    guard let expected = try await checksum(of: export) else { throw CancellationError() }
    await export.close()
    guard try await verify(FileEndpoint.source(backup), matches: expected) else { throw CancellationError() }
    print("wrote \(report.bytes - report.skippedBytes) of \(report.bytes) bytes; the backup's blkhash is \(expected)")
}
// snippet.end
