import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Standard output and standard error, written with write(2) so that a failed write is handled
/// here and never traps (Foundation's `FileHandle.write(_: Data)` traps on EPIPE).
enum StandardStreams {
    /// Called once at start: a reader that went away then fails a write with EPIPE, handled
    /// below, instead of killing the process with SIGPIPE.
    static func ignoreBrokenPipes() {
        signal(SIGPIPE, SIG_IGN)
    }

    /// Writes `text` to standard output. A reader that went away (`nbd dump | head`) ends the
    /// program quietly with status 0, as nbddump and hexdump do; another failure (a full disk)
    /// is one line on standard error and status 1.
    static func output(_ text: String) {
        var text = text
        text.withUTF8 { output(UnsafeRawBufferPointer($0)) }
    }

    /// Writes `bytes` to standard output, as ``output(_:)-swift.type.method`` does text.
    static func output(_ bytes: UnsafeRawBufferPointer) {
        let failure = write(bytes, to: 1)
        guard failure != 0 else { return }
        if failure == EPIPE { exit(0) }
        error("nbd: cannot write to standard output: \(String(cString: strerror(failure)))\n")
        exit(1)
    }

    /// Writes `text` to standard error. A failure is ignored: there is nowhere left to say it.
    static func error(_ text: String) {
        var text = text
        _ = text.withUTF8 { write(UnsafeRawBufferPointer($0), to: 2) }
    }

    /// Writes all of `bytes`; returns 0, or the errno of the write that failed.
    private static func write(_ bytes: UnsafeRawBufferPointer, to descriptor: Int32) -> Int32 {
        var rest = bytes
        while !rest.isEmpty {
            let written = Foundation.write(descriptor, rest.baseAddress, rest.count)
            if written < 0 {
                if errno == EINTR { continue }
                return errno
            }
            rest = UnsafeRawBufferPointer(rebasing: rest[written...])
        }
        return 0
    }
}

/// Text for standard output gathered into large writes: `nbd dump` makes a line per 16 bytes,
/// and a system call per line would cost more than the dump.
struct BufferedOutput {
    private var pending: [UInt8] = []
    private static let flushAt = 64 * 1024

    mutating func write(_ text: String) {
        pending.append(contentsOf: text.utf8)
        if pending.count >= Self.flushAt { flush() }
    }

    mutating func flush() {
        pending.withUnsafeBytes { StandardStreams.output($0) }
        pending.removeAll(keepingCapacity: true)
    }
}
