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
    // Both pipes are at their end: the process has closed them, and is ending or has ended.
    let deadline = ContinuousClock.now + waitDeadline
    while process.isRunning {
        guard ContinuousClock.now < deadline else {
            throw WaitTimedOut(description: "waited \(waitDeadline) for \(executable) to end after closing its output; saw: still running")
        }
        usleep(1000)
    }
    return (process.terminationStatus, data, errorText)
}
