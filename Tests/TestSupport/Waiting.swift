import Foundation

/// What a test waited for and did not see within its deadline, with what it saw instead.
public struct WaitTimedOut: Error, CustomStringConvertible {
    public var description: String
}

/// A test's set-up that could not be done, in words.
public struct TestFailure: Error, CustomStringConvertible {
    public var description: String
}

/// The deadline of every wait on another process: long enough for a machine busy with other
/// work (a loaded CI runner, a sanitizer), so that only a real failure reaches it.
public let waitDeadline: Duration = .seconds(30)

/// Polls `condition` until it holds, and fails with what was waited for (`what`) and what was
/// seen last (`seen`) when `deadline` passes first. A test never decides by sleeping: each wait
/// on another process (listening, gone, a file there, a count reached) goes through here.
public func waitUntil(
    _ what: @autoclosure () -> String,
    deadline: Duration = waitDeadline,
    seen: @autoclosure () -> String = "not yet",
    _ condition: () async throws -> Bool
) async throws {
    let start = ContinuousClock.now
    var interval = Duration.milliseconds(2)
    while try await !condition() {
        guard ContinuousClock.now - start < deadline else {
            throw WaitTimedOut(description: "waited \(deadline) for \(what()); saw: \(seen())")
        }
        await pause(interval)
        interval = min(interval * 2, .milliseconds(50))
    }
}

/// Lets `duration` pass, even in a cancelled task (where `Task.sleep` returns at once), so that
/// a wait that must finish (a process reaped in clean-up) does not spin.
func pause(_ duration: Duration) async {
    do { try await Task.sleep(for: duration) } catch {
        let (seconds, attoseconds) = duration.components
        usleep(UInt32(seconds * 1_000_000 + attoseconds / 1_000_000_000_000))
    }
}

extension Process {
    /// Waits until the process has ended, at most `deadline`. Not `waitUntilExit()`: it runs the
    /// calling thread's run loop, and on a Swift concurrency thread it can wait for ever.
    public func exited(within deadline: Duration = waitDeadline) async throws {
        let name = executableURL?.lastPathComponent ?? "the process"
        try await waitUntil("\(name) (\(processIdentifier)) to end", deadline: deadline, seen: "still running") { !isRunning }
    }
}

/// Bytes a running process has read and written through system calls so far (sockets, pipes and
/// files alike: `rchar` and `wchar` of /proc/PID/io), to wait until a copy is under way.
public func bytesMoved(by pid: pid_t) -> (read: Int, written: Int) {
    let text = (try? String(contentsOfFile: "/proc/\(pid)/io", encoding: .utf8)) ?? ""
    func value(_ key: String) -> Int {
        text.split(separator: "\n").first { $0.hasPrefix(key + ":") }
            .flatMap { Int($0.dropFirst(key.count + 1).trimmingCharacters(in: .whitespaces)) } ?? 0
    }
    return (value("rchar"), value("wchar"))
}

/// A TCP port on loopback that the kernel handed out just now: bound to port 0, read back and
/// released, for a server that takes its port on the command line. Another process may still
/// take it before the server binds it: starting a server retries on a new port then
/// (`ServerProcess.startOnFreePort`).
public func freeLoopbackPort() throws -> Int {
    let (descriptor, port) = try boundLoopbackSocket()
    close(descriptor)
    return port
}

/// Runs `body` with a TCP port on loopback that refuses connections: bound, and held for the
/// length of `body`, but not listening, so that no other test can take it meanwhile (as a
/// port closed just before could be).
@discardableResult
public func withRefusingLoopbackPort<Result>(_ body: (Int) async throws -> Result) async throws -> Result {
    let (descriptor, port) = try boundLoopbackSocket()
    defer { close(descriptor) }
    return try await body(port)
}

/// A TCP socket bound to a port of the kernel's choosing on 127.0.0.1, and that port.
private func boundLoopbackSocket() throws -> (descriptor: Int32, port: Int) {
    let descriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard descriptor >= 0 else { throw TestFailure(description: "socket() failed: \(String(cString: strerror(errno)))") }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    address.sin_port = 0
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafeMutablePointer(to: &address) { pointer in
        pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { address in
            bind(descriptor, address, length) == 0 && getsockname(descriptor, address, &length) == 0
        }
    }
    guard bound else {
        let reason = String(cString: strerror(errno))
        close(descriptor)
        throw TestFailure(description: "no free port on loopback: \(reason)")
    }
    return (descriptor, Int(UInt16(bigEndian: address.sin_port)))
}

/// Waits until the file at `path` (a server's log) holds `text`.
public func waitUntil(file path: String, holds text: String) async throws {
    try await waitUntil("\"\(text)\" in \(path)", seen: "\((try? String(contentsOfFile: path, encoding: .utf8))?.suffix(300) ?? "no file")")
    {
        ((try? String(contentsOfFile: path, encoding: .utf8)) ?? "").contains(text)
    }
}
