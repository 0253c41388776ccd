// docs/Library.md's concurrency examples: many tasks on one export, and data passed on uncopied.
import NBD

// snippet.executor
func readInParallel(_ export: NBDExport) async throws {
    try await withTaskExecutorPreference(export.taskExecutor) {
        try await withThrowingTaskGroup(of: Void.self) { group in
            for i in 0..<64 {
                group.addTask { _ = try await export.read(at: UInt64(i) << 20, length: 1 << 20) }
            }
            try await group.waitForAll()
        }
    }
}
// snippet.end

// snippet.segments
func passOn(from source: NBDExport, to destination: NBDExport) async throws {
    let pieces = try await source.readSegments(at: 0, length: 4 << 20)
    try await destination.write(segments: pieces, at: 0)  // gathered by the kernel, not by us
}
// snippet.end
