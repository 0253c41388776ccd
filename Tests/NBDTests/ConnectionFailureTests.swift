import NIOCore
import Testing

@testable import NBD

#if canImport(Glibc)
import Glibc
#endif

/// Socket errors reach people in words, not as SwiftNIO's call names.
@Suite("Connection failures in words")
struct ConnectionFailureTests {
    @Test func socketErrorsAreSaidInWords() throws {
        let reset = try #require(ConnectionFailure(IOError(errnoCode: ECONNRESET, reason: "read(descriptor:pointer:size:)")))
        #expect(reset.description == "the server reset the connection (ECONNRESET)")
        let pipe = try #require(ConnectionFailure(IOError(errnoCode: EPIPE, reason: "write(descriptor:pointer:size:)")))
        #expect(pipe.description == "the server closed the connection while it was being written to (EPIPE)")
        let other = try #require(ConnectionFailure(IOError(errnoCode: EIO, reason: "readv(descriptor:iovecs:)")))
        #expect(other.description == "input/output error (errno \(EIO))")
        #expect(ConnectionFailure(CancellationError()) == nil)
    }
}
