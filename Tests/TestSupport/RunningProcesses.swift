import Foundation

/// Runs a program to its end: exit status, standard output, standard error.
public func runProcess(
    _ executable: String,
    _ arguments: [String],
    in directory: URL? = nil
) throws -> (status: Int32, output: Data, error: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    process.currentDirectoryURL = directory
    let output = Pipe()
    let error = Pipe()
    process.standardOutput = output
    process.standardError = error
    try process.run()
    let data = output.fileHandleForReading.readDataToEndOfFile()
    let errorText = String(decoding: error.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    while process.isRunning { usleep(1000) }
    return (process.terminationStatus, data, errorText)
}

extension Process {
    /// Waits until the process has ended. Not `waitUntilExit()`: it runs the calling thread's
    /// run loop, and on a Swift concurrency thread it can wait for ever.
    public func exited() async {
        while isRunning {
            // In a cancelled task the sleep returns at once: wait all the same, without spinning.
            do { try await Task.sleep(for: .milliseconds(10)) } catch { usleep(10_000) }
        }
    }
}
