@_spi(NBDMachines) import NBDCore
import NBDSystem
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Connects sockets here, then hands them to SwiftNIO: the client keeps the descriptor to read
/// READ data straight into its destination (see ``DirectRead``).
///
/// Abstract Unix names (Linux) need this anyway: SwiftNIO passes the full `sockaddr_un` size
/// to `connect`, which names a different (NUL-padded) abstract socket than servers bind.
enum SocketConnector {
    /// A connected stream socket to `address`, within `timeout`. Cancelling the task stops a
    /// connection in progress (within a tenth of a second) with `CancellationError`.
    static func connect(to address: NBDAddress, timeout: TimeAmount) async throws -> NIOBSDSocket.Handle {
        let deadline = NIODeadline.now() + timeout
        let cancelled = NIOLockedValueBox(false)
        do {
            switch address {
            case .tcp(let host, let port):
                // getaddrinfo and the wait for the connection block: off the caller's thread.
                return try await withTaskCancellationHandler {
                    try await NIOThreadPool.singleton.runIfActive {
                        try tcp(host: host, port: port, deadline: deadline, cancelled: cancelled)
                    }
                } onCancel: {
                    cancelled.withLockedValue { $0 = true }
                }
            case .unix(let path):
                return try unix(Array(path.utf8) + [0], length: path.utf8.count, deadline: deadline, cancelled: cancelled)
            case .abstractUnix(let name):
                #if os(Linux)
                return try unix([0] + Array(name.utf8), length: name.utf8.count + 1, deadline: deadline, cancelled: cancelled)
                #else
                throw Failure("abstract Unix sockets exist only on Linux")
                #endif
            case .vsock(let cid, let port):
                #if os(Linux)
                return try vsock(cid: cid, port: port, deadline: deadline, cancelled: cancelled)
                #else
                throw Failure("vsock exists only on Linux")
                #endif
            }
        } catch let failure as Failure {
            if failure.cancelled { throw CancellationError() }
            if failure.timedOut {
                throw NBDError(
                    .connectFailed,
                    "cannot connect to \(address): no answer within \(timeout.secondsText)",
                    connectionUsable: false
                )
            }
            throw NBDError(.connectFailed, "cannot connect to \(address): \(failure.reason)", connectionUsable: false)
        }
    }

    private struct Failure: Error {
        var reason: String
        var timedOut = false
        var cancelled = false
        init(_ reason: String) { self.reason = reason }
        static let timeout = {
            var failure = Failure("timed out")
            failure.timedOut = true
            return failure
        }()
        static let cancellation = {
            var failure = Failure("cancelled")
            failure.cancelled = true
            return failure
        }()
        init(_ call: String, _ code: Int32) { reason = call.isEmpty ? CLibrary.errorText(code) : "\(call): \(CLibrary.errorText(code))" }
    }

    /// `path` holds the name's bytes (a path with its NUL, or an abstract name after its NUL);
    /// the address is `length` of them long.
    private static func unix(
        _ path: [UInt8],
        length: Int,
        deadline: NIODeadline,
        cancelled: NIOLockedValueBox<Bool>
    ) throws(Failure) -> NIOBSDSocket.Handle {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        guard path.count <= MemoryLayout.size(ofValue: address.sun_path) else { throw Failure("the name is too long") }
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: path) }
        let size = socklen_t(MemoryLayout.offset(of: \sockaddr_un.sun_path)! + length)
        #if canImport(Darwin)
        address.sun_len = UInt8(size)
        #endif
        return try withUnsafeBytes(of: &address) { raw throws(Failure) in
            try connect(
                family: AF_UNIX,
                raw.baseAddress!.assumingMemoryBound(to: sockaddr.self),
                size,
                deadline: deadline,
                cancelled: cancelled
            )
        }
    }

    #if os(Linux)
    /// `AF_VSOCK` (`linux/vm_sockets.h`, which Glibc's module does not carry): a
    /// `struct sockaddr_vm` of 16 bytes, family, reserved, port and context id in host order.
    private static func vsock(
        cid: UInt32,
        port: UInt32,
        deadline: NIODeadline,
        cancelled: NIOLockedValueBox<Bool>
    ) throws(Failure) -> NIOBSDSocket.Handle {
        let family: Int32 = 40  // AF_VSOCK
        var address: (UInt64, UInt64) = (0, 0)
        withUnsafeMutableBytes(of: &address) { bytes in
            bytes.storeBytes(of: UInt16(family), toByteOffset: 0, as: UInt16.self)
            bytes.storeBytes(of: port, toByteOffset: 4, as: UInt32.self)
            bytes.storeBytes(of: cid, toByteOffset: 8, as: UInt32.self)
        }
        return try withUnsafeBytes(of: &address) { raw throws(Failure) in
            try connect(
                family: family,
                raw.baseAddress!.assumingMemoryBound(to: sockaddr.self),
                socklen_t(raw.count),
                deadline: deadline,
                cancelled: cancelled
            )
        }
    }
    #endif

    /// Tries each address of `host` in turn, as SwiftNIO and libnbd do.
    private static func tcp(
        host: String,
        port: Int,
        deadline: NIODeadline,
        cancelled: NIOLockedValueBox<Bool>
    ) throws(Failure)
        -> NIOBSDSocket.Handle
    {
        var hints = addrinfo()
        hints.ai_socktype = CLibrary.socketStream
        hints.ai_family = AF_UNSPEC
        var list: UnsafeMutablePointer<addrinfo>?
        let status = getaddrinfo(host, String(port), &hints, &list)
        guard status == 0, let list else { throw Failure("cannot resolve \(host): \(String(cString: gai_strerror(status)))") }
        defer { freeaddrinfo(list) }
        var failure = Failure("no address")
        var entry: UnsafeMutablePointer<addrinfo>? = list
        while let current = entry?.pointee {
            entry = current.ai_next
            guard let address = current.ai_addr else { continue }
            do {
                return try connect(family: current.ai_family, address, current.ai_addrlen, deadline: deadline, cancelled: cancelled)
            } catch {
                if error.cancelled || error.timedOut { throw error }
                failure = error
            }
        }
        throw failure
    }

    /// A new socket connected to `address`, waiting for the connection until `deadline`.
    private static func connect(
        family: Int32,
        _ address: UnsafePointer<sockaddr>,
        _ length: socklen_t,
        deadline: NIODeadline,
        cancelled: NIOLockedValueBox<Bool>
    ) throws(Failure) -> NIOBSDSocket.Handle {
        let fd = socket(family, CLibrary.socketStream, 0)
        guard fd >= 0 else { throw Failure("socket()", errno) }
        var done = false
        defer { if !done { _ = CLibrary.close(fd) } }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        if CLibrary.connect(fd, address, length) != 0 {
            guard errno == EINPROGRESS else { throw Failure("", errno) }
            var poller = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
            // In slices of at most 100 ms, so that a cancelled task stops waiting.
            while true {
                if cancelled.withLockedValue({ $0 }) { throw Failure.cancellation }
                let left = (deadline - .now()).nanoseconds / 1_000_000
                if left <= 0 { throw Failure.timeout }
                let ready = poll(&poller, 1, Int32(clamping: min(left, 100)))
                if ready > 0 { break }
                guard ready == 0 || errno == EINTR else { throw Failure("poll()", errno) }
            }
            var error: Int32 = 0
            var size = socklen_t(MemoryLayout<Int32>.size)
            guard getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &size) == 0 else { throw Failure("getsockopt()", errno) }
            guard error == 0 else { throw Failure("", error) }
        }
        done = true
        return fd
    }
}
