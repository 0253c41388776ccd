#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The C library's calls under names that are the same on Linux and macOS, and that a method
/// of the same name inside a type does not hide: the package's one shim over the C library,
/// used by the client's sockets, the server's files and the `nbd` tool.
package enum CLibrary {
    #if canImport(Glibc)
    package static let read = Glibc.read, write = Glibc.write, close = Glibc.close, connect = Glibc.connect
    package static let socketStream = Int32(SOCK_STREAM.rawValue)
    #else
    package static let read = Darwin.read, write = Darwin.write, close = Darwin.close, connect = Darwin.connect
    package static let socketStream = SOCK_STREAM
    #endif

    /// The text of a C library error number.
    package static func errorText(_ code: Int32) -> String { String(cString: strerror(code)) }
}
