import NBDSystem
import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A socket error as a person reads it: "the server reset the connection (ECONNRESET)", not
/// SwiftNIO's "read(descriptor:pointer:size:): Connection reset by peer (errno: 104)".
struct ConnectionFailure: Error, CustomStringConvertible {
    let description: String
    /// The socket error underneath.
    let underlying: any Error

    /// `error` in words when it is a socket error; nil for any other error.
    init?(_ error: any Error) {
        guard let io = error as? IOError else { return nil }
        underlying = io
        let code = io.errnoCode
        description =
            switch code {
            case ECONNRESET: "the server reset the connection (ECONNRESET)"
            case EPIPE: "the server closed the connection while it was being written to (EPIPE)"
            case ETIMEDOUT: "the connection timed out (ETIMEDOUT)"
            case ECONNABORTED: "the connection was aborted (ECONNABORTED)"
            case EHOSTUNREACH: "the server's host cannot be reached (EHOSTUNREACH)"
            case ENETUNREACH: "the server's network cannot be reached (ENETUNREACH)"
            default: "\(CLibrary.errorText(code).lowercased()) (errno \(code))"
            }
    }
}
