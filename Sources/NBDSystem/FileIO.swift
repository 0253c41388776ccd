#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Reads and writes of a file descriptor that loop over short transfers and `EINTR`: the one
/// pread/pwrite loop of the package, under ``LocalFile`` and the `nbd` tool's journal.
package enum FileIO {
    /// Reads into `room` from `offset`, or from the descriptor's position when `offset` is nil
    /// (a pipe). Answers how many bytes were read: fewer than `room` only at the end of the
    /// file. Fails with the C library's error number (`EOVERFLOW` for an offset past `off_t`).
    package static func read(_ descriptor: Int32, into room: UnsafeMutableRawBufferPointer, at offset: UInt64?) -> Result<Int, FileIOError>
    {
        var done = 0
        while done < room.count {
            let rest = UnsafeMutableRawBufferPointer(rebasing: room[done...])
            let count: Int
            if let offset {
                guard let position = position(offset, done) else { return .failure(FileIOError(code: EOVERFLOW)) }
                count = pread(descriptor, rest.baseAddress, rest.count, position)
            } else {
                count = CLibrary.read(descriptor, rest.baseAddress, rest.count)
            }
            if count < 0 && errno == EINTR { continue }
            guard count >= 0 else { return .failure(FileIOError(code: errno)) }
            if count == 0 { break }
            done += count
        }
        return .success(done)
    }

    /// Writes all of `bytes` at `offset`, or at the descriptor's position when `offset` is nil.
    package static func write(_ descriptor: Int32, _ bytes: UnsafeRawBufferPointer, at offset: UInt64?) -> Result<Void, FileIOError> {
        var done = 0
        while done < bytes.count {
            let rest = UnsafeRawBufferPointer(rebasing: bytes[done...])
            let count: Int
            if let offset {
                guard let position = position(offset, done) else { return .failure(FileIOError(code: EOVERFLOW)) }
                count = pwrite(descriptor, rest.baseAddress, rest.count, position)
            } else {
                count = CLibrary.write(descriptor, rest.baseAddress, rest.count)
            }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { return .failure(FileIOError(code: count < 0 ? errno : EIO)) }
            done += count
        }
        return .success(())
    }

    /// `offset + done` as an `off_t`, or nil when it does not fit (a peer's number, never trusted).
    private static func position(_ offset: UInt64, _ done: Int) -> off_t? {
        let (sum, overflow) = offset.addingReportingOverflow(UInt64(done))
        return overflow ? nil : off_t(exactly: sum)
    }
}

/// A C library error number from ``FileIO``, with its text.
package struct FileIOError: Error, CustomStringConvertible {
    package let code: Int32
    package init(code: Int32) { self.code = code }
    /// `ENOSPC`: the file system is full.
    /// No room: the file system is full, or the file would be larger than it allows.
    package var isOutOfSpace: Bool { code == ENOSPC || code == EFBIG }
    package var description: String { CLibrary.errorText(code) }
}
