import NIOCore
import NIOPosix
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A local file, block device or standard stream: the one file layer of the server's
/// `FileBackend` and the `nbd` tool's copies. Every call that can block (reads, writes,
/// syncing, finding holes, zeroing) runs on a thread pool, never on an event loop or in
/// Swift's cooperative pool; a small read of a regular file whose bytes are all in the page
/// cache, which cannot block, is done where it is asked for.
package final class LocalFile: Sendable {
    /// What the descriptor is: it decides how the size is found and how zeroes are made.
    package enum Kind: Sendable, Equatable {
        case regular
        case blockDevice
        /// A pipe, terminal or character device, read and written in order, with no size.
        case stream
    }

    /// How a file is opened.
    package enum Access: Sendable {
        case read
        case readWrite
        /// Write only, created (mode 0644) when it does not exist.
        case createOrWrite
    }

    package let path: String
    package let descriptor: Int32
    package let kind: Kind
    /// Standard input and output are not closed with the value.
    private let ownsDescriptor: Bool
    private let pool: NIOThreadPool
    /// Whether reads try the page cache first (see ``FileIO/readCached(_:into:at:)``): false
    /// once the file system said it cannot tell.
    private let readsCached = Atomic(true)
    /// Largest read tried in place: a larger one is mostly the copy out of the page cache,
    /// which on the pool runs beside the caller's thread rather than in its way (a copy from
    /// a file with 256 KiB requests went 16 % slower with them in place).
    private static let largestReadInPlace = 64 << 10

    /// Opens `path`; fails with the C library's error.
    package init(path: String, access: Access, pool: NIOThreadPool = .singleton) throws(FileIOError) {
        let flags: Int32 =
            switch access {
            case .read: O_RDONLY
            case .readWrite: O_RDWR
            case .createOrWrite: O_WRONLY | O_CREAT
            }
        let fd = open(path, flags | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw FileIOError(code: errno) }
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            let code = errno
            _ = CLibrary.close(fd)
            throw FileIOError(code: code)
        }
        self.path = path
        self.descriptor = fd
        self.kind = Self.kind(of: info.st_mode)
        self.ownsDescriptor = true
        self.pool = pool
    }

    /// Standard input (0) or output (1), read or written in order and never closed here.
    package init(standardStream descriptor: Int32, pool: NIOThreadPool = .singleton) {
        self.path = descriptor == 0 ? "standard input" : "standard output"
        self.descriptor = descriptor
        // Even a regular file behind it is read or written from its position, in order.
        self.kind = .stream
        self.ownsDescriptor = false
        self.pool = pool
    }

    deinit {
        if ownsDescriptor { _ = CLibrary.close(descriptor) }
    }

    private static func kind(of mode: mode_t) -> Kind {
        switch mode & S_IFMT {
        case S_IFREG: .regular
        case S_IFBLK: .blockDevice
        default: .stream
        }
    }

    /// The size in bytes: the end of a regular file, a block device's size from the kernel
    /// (`BLKGETSIZE64`), nil for a stream.
    package func size() throws(FileIOError) -> UInt64? {
        switch kind {
        case .stream:
            return nil
        case .regular:
            let end = lseek(descriptor, 0, SEEK_END)
            guard end >= 0 else { throw FileIOError(code: errno) }
            return UInt64(end)
        case .blockDevice:
            #if os(Linux)
            var bytes: UInt64 = 0
            // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
            let result = withUnsafeMutablePointer(to: &bytes) { ioctl(descriptor, 0x8008_1272, $0) }
            guard result == 0 else { throw FileIOError(code: errno) }
            return bytes
            #else
            let end = lseek(descriptor, 0, SEEK_END)
            guard end >= 0 else { throw FileIOError(code: errno) }
            return UInt64(end)
            #endif
        }
    }

    /// The bytes of the blocks the file holds on disk (`st_blocks`): how sparse it is.
    package func allocatedBytes() throws(FileIOError) -> UInt64 {
        var info = stat()
        guard fstat(descriptor, &info) == 0 else { throw FileIOError(code: errno) }
        return UInt64(info.st_blocks) * 512
    }

    /// What tells this state of a regular file from any later one: its device and inode, size,
    /// and the times of its last change of data and of inode, in nanoseconds (a write changes
    /// the change time, which no one can set back). Nil for a block device or a stream, whose
    /// writes change nothing one can read.
    package func stateIdentity() -> String? {
        var info = stat()
        guard kind == .regular, fstat(descriptor, &info) == 0 else { return nil }
        #if canImport(Darwin)
        let (modified, changed) = (info.st_mtimespec, info.st_ctimespec)
        #else
        let (modified, changed) = (info.st_mtim, info.st_ctim)
        #endif
        return "file \(info.st_dev):\(info.st_ino) size \(info.st_size) modified \(modified.tv_sec).\(modified.tv_nsec) "
            + "changed \(changed.tv_sec).\(changed.tv_nsec)"
    }

    /// Sets a regular file's length (`ftruncate`): what is added reads as zeroes and takes no space.
    package func setLength(_ length: UInt64) throws(FileIOError) {
        // The length may come from a peer: checked before it becomes an off_t.
        guard let end = off_t(exactly: length) else { throw FileIOError(code: EFBIG) }
        guard ftruncate(descriptor, end) == 0 else { throw FileIOError(code: errno) }
    }

    /// Runs `body` on the thread pool.
    package func blocking<Result: Sendable>(_ body: @escaping @Sendable () throws -> Result) async throws -> Result {
        try await pool.runIfActive(body)
    }

    /// Appends `length` bytes read at `offset` (a stream: the next bytes) to `buffer`; answers
    /// how many came, fewer only at the end of the file. The buffer's storage is reused: the
    /// bytes are read straight into it.
    @discardableResult
    package func read(into buffer: inout ByteBuffer, at offset: UInt64, length: Int) async throws -> Int {
        // Allocated here, by the caller's thread, which frees it too: memory that one thread
        // allocates and another frees is returned to the system and faulted in again each time.
        buffer.reserveCapacity(minimumWritableBytes: length)
        if kind == .regular, length <= Self.largestReadInPlace, readsCached.load(ordering: .relaxed) {
            let fd = descriptor
            var outcome = FileIO.CachedRead.notCached
            buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { room in
                outcome = FileIO.readCached(fd, into: UnsafeMutableRawBufferPointer(rebasing: room.prefix(length)), at: offset)
                return outcome == .read ? length : 0
            }
            if outcome == .read { return length }
            if outcome == .unsupported { readsCached.store(false, ordering: .relaxed) }
        }
        let box = BufferBox(buffer)
        buffer = ByteBuffer()
        defer { buffer = box.buffer }
        let fd = descriptor
        let position: UInt64? = kind == .stream ? nil : offset
        return try await blocking {
            try box.buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { pointer in
                try FileIO.read(fd, into: UnsafeMutableRawBufferPointer(rebasing: pointer.prefix(length)), at: position).get()
            }
        }
    }

    /// Writes `buffers`, one after another, from `offset` (a stream: in order).
    package func write(_ buffers: [ByteBuffer], at offset: UInt64) async throws {
        let fd = descriptor
        let isStream = kind == .stream
        try await blocking {
            var position = offset
            for buffer in buffers {
                try buffer.withUnsafeReadableBytes { try FileIO.write(fd, $0, at: isStream ? nil : position).get() }
                position += UInt64(buffer.readableBytes)
            }
        }
    }

    /// `fsync`: what was written is on stable storage. Nothing to do for a stream.
    package func sync() async throws {
        guard kind != .stream else { return }
        let fd = descriptor
        try await blocking {
            guard fsync(fd) == 0 else { throw FileIOError(code: errno) }
        }
    }
}

/// A buffer handed to the thread pool and back, so that it is uniquely held there and grows
/// in place; used by one call at a time.
private final class BufferBox: @unchecked Sendable {
    var buffer: ByteBuffer
    init(_ buffer: ByteBuffer) { self.buffer = buffer }
}
