#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Reads and writes of a file descriptor that loop over short transfers and `EINTR`: the one
/// pread/pwrite loop of the package, under ``LocalFile`` and the `nbd` tool's journal.
package enum FileIO {
    /// What ``readCached(_:into:at:)`` did.
    package enum CachedRead: Equatable {
        /// Read all of the room.
        case read
        /// Not all of it is in the page cache (or the file ends before): read it on a thread
        /// that may wait.
        case notCached
        /// The file system cannot tell (tmpfs answers `EOPNOTSUPP`), or the platform has no
        /// such read: do not ask again for this file.
        case unsupported
    }

    /// Fills `room` from `offset` only if the page cache holds every byte of it: `preadv2`
    /// with `RWF_NOWAIT`, which fails at once rather than wait for the disk. Such a read costs
    /// less on the caller's thread (an event loop's) than a hop to a pool thread and back:
    /// 4 KiB copied from a cached file took 11 µs of CPU through the pool, against nbdcopy's 8.
    package static func readCached(_ descriptor: Int32, into room: UnsafeMutableRawBufferPointer, at offset: UInt64) -> CachedRead {
        #if canImport(Glibc)
        guard let preadv2 = Self.preadv2 else { return .unsupported }
        guard let position = off_t(exactly: offset) else { return .notCached }
        var vector = iovec(iov_base: room.baseAddress, iov_len: room.count)
        while true {
            let count = preadv2(descriptor, &vector, 1, position, Self.noWait)
            if count == room.count { return .read }
            if count < 0 && errno == EINTR { continue }
            return count < 0 && (errno == EOPNOTSUPP || errno == ENOSYS || errno == EINVAL) ? .unsupported : .notCached
        }
        #else
        return .unsupported
        #endif
    }

    #if canImport(Glibc)
    /// `preadv2(2)`, looked up at run time: Swift's Glibc module does not import it (glibc
    /// declares it for `_GNU_SOURCE` only, from 2.26 on).
    private typealias PReadV2 = @convention(c) (Int32, UnsafePointer<iovec>?, Int32, off_t, Int32) -> Int
    private static let preadv2: PReadV2? = dlsym(nil, "preadv2").map { unsafeBitCast($0, to: PReadV2.self) }
    /// `RWF_NOWAIT` of linux/fs.h (Linux 4.14).
    private static let noWait: Int32 = 0x8
    #endif

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
