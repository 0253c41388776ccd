#if os(Linux)
import Glibc
#endif
import NIOCore
import NBDCore

/// Linux abstract-namespace Unix sockets. SwiftNIO passes the full `sockaddr_un` size to
/// `connect`, which names a different (NUL-padded) abstract socket than servers bind, so the
/// socket is connected here with the exact length and then handed to NIO.
enum AbstractSocket {
    static func connect(_ name: String) throws -> NIOBSDSocket.Handle {
        #if os(Linux)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw failure(name, "socket() failed") }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = [UInt8(0)] + Array(name.utf8)
        guard bytes.count <= MemoryLayout.size(ofValue: address.sun_path) else {
            close(fd)
            throw failure(name, "the name is too long")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes) }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count)
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, length) }
        }
        guard result == 0 else {
            close(fd)
            throw failure(name, "connect() failed with errno \(errno)")
        }
        return fd
        #else
        throw failure(name, "abstract Unix sockets exist only on Linux")
        #endif
    }

    private static func failure(_ name: String, _ why: String) -> NBDError {
        NBDError(.connectionClosed, "cannot connect to abstract socket @\(name): \(why)", connectionUsable: false)
    }
}
