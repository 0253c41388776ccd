import NIOCore
import NIOEmbedded
import TestSupport
import Testing

@testable import NBD

/// The cipher suite read from a server's first TLS record, which swift-nio-ssl does not report.
@Suite("TLS ServerHello")
struct ServerHelloTests {
    /// RFC 8448's simple 1-RTT handshake: the server's first record (ServerHello, TLS 1.3,
    /// empty legacy session id, TLS_AES_128_GCM_SHA256), up to the extensions.
    static let tls13: [UInt8] = [
        0x16, 0x03, 0x03, 0x00, 0x5A, 0x02, 0x00, 0x00, 0x56, 0x03, 0x03,
        0xA6, 0xAF, 0x06, 0xA4, 0x12, 0x18, 0x60, 0xDC, 0x5E, 0x6E, 0x60, 0x24, 0x9C, 0xD3, 0x4C, 0x95,
        0x93, 0x0C, 0x8A, 0xC5, 0xCB, 0x14, 0x34, 0xDA, 0xC1, 0x55, 0x77, 0x2E, 0xD3, 0xE2, 0x69, 0x28,
        0x00, 0x13, 0x01, 0x00, 0x00, 0x2E, 0x00, 0x33, 0x00, 0x24, 0x00, 0x1D, 0x00, 0x20,
    ]

    /// A TLS 1.2 ServerHello with a 32-byte session id and TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA.
    static let tls12: [UInt8] =
        [0x16, 0x03, 0x03, 0x00, 0x4A, 0x02, 0x00, 0x00, 0x46, 0x03, 0x03]
        + [UInt8](repeating: 0x11, count: 32) + [0x20] + [UInt8](repeating: 0x22, count: 32) + [0xC0, 0x35, 0x00]

    @Test func findsTheSuiteOfATLS13ServerHello() {
        #expect(TLSServerHello.cipherSuite(in: ByteBuffer(bytes: Self.tls13)) == .found(0x1301))
        #expect(TLSServerHello.name(of: 0x1301) == "TLS_AES_128_GCM_SHA256")
    }

    @Test func findsTheSuiteAfterASessionID() {
        #expect(TLSServerHello.cipherSuite(in: ByteBuffer(bytes: Self.tls12)) == .found(0xC035))
        #expect(TLSServerHello.name(of: 0xC035) == "TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA")
    }

    @Test func waitsForMoreUntilTheSuiteArrives() {
        // Record 5 + handshake 4 + version 2 + random 32 + session id length 1, then the suite.
        for length in 0..<(5 + 4 + 2 + 32 + 1 + 2) {
            #expect(TLSServerHello.cipherSuite(in: ByteBuffer(bytes: Self.tls13.prefix(length))) == .needMore, "prefix \(length)")
        }
        #expect(TLSServerHello.cipherSuite(in: ByteBuffer(bytes: Self.tls13.prefix(46))) == .found(0x1301))
        // The observer looks at no more than `longestPrefix` bytes: enough for the longest session id.
        #expect(TLSServerHello.cipherSuite(in: ByteBuffer(bytes: Self.tls12.prefix(TLSServerHello.longestPrefix))) == .found(0xC035))
    }

    @Test func givesUpOnAnythingElse() {
        var alert = Self.tls13
        alert[0] = 0x15
        #expect(TLSServerHello.cipherSuite(in: ByteBuffer(bytes: alert)) == .notServerHello)
        var clientHello = Self.tls13
        clientHello[5] = 0x01
        #expect(TLSServerHello.cipherSuite(in: ByteBuffer(bytes: clientHello)) == .notServerHello)
        var longSessionID = Self.tls12
        longSessionID[43] = 33
        #expect(TLSServerHello.cipherSuite(in: ByteBuffer(bytes: longSessionID)) == .notServerHello)
        var shortRecord = Self.tls12
        shortRecord[4] = 20
        #expect(TLSServerHello.cipherSuite(in: ByteBuffer(bytes: shortRecord)) == .notServerHello)
        #expect(TLSServerHello.name(of: 0xABCD) == "0xABCD")
    }
}

extension ServerHelloTests {
    /// What the parser must answer, written the slow way: a handshake record (22) holding a
    /// ServerHello (2), whose suite follows a session id of at most 32 bytes.
    static func expected(_ bytes: [UInt8]) -> TLSServerHello.Parse {
        guard let type = bytes.first else { return .needMore }
        guard type == 22 else { return .notServerHello }
        guard bytes.count > 5 else { return .needMore }
        guard bytes[5] == 2 else { return .notServerHello }
        guard bytes.count > 43 else { return .needMore }
        let sessionIDLength = Int(bytes[43])
        let recordLength = Int(bytes[3]) << 8 | Int(bytes[4])
        guard sessionIDLength <= 32, recordLength >= 4 + 2 + 32 + 1 + sessionIDLength + 2 else { return .notServerHello }
        guard bytes.count >= 46 + sessionIDLength else { return .needMore }
        return .found(UInt16(bytes[44 + sessionIDLength]) << 8 | UInt16(bytes[45 + sessionIDLength]))
    }

    /// Whatever the server sends first, the parser gives the answer the record's layout calls
    /// for, without crashing.
    @Test func randomBytesNeverCrashTheParser() {
        let seed = testSeed()
        var generator = SeededGenerator(seed: seed)
        for round in 0..<20_000 {
            var bytes = Self.tls13
            if Bool.random(using: &generator) {
                bytes = (0..<Int.random(in: 0...90, using: &generator)).map { _ in UInt8.random(in: 0...255, using: &generator) }
            } else {
                for _ in 0..<Int.random(in: 1...4, using: &generator) {
                    bytes[Int.random(in: 0..<bytes.count, using: &generator)] = UInt8.random(in: 0...255, using: &generator)
                }
                bytes = Array(bytes.prefix(Int.random(in: 0...bytes.count, using: &generator)))
            }
            #expect(
                TLSServerHello.cipherSuite(in: ByteBuffer(bytes: bytes)) == Self.expected(bytes),
                "seed \(seed), round \(round): \(bytes)"
            )
        }
    }

    /// The observer passes every byte on untouched, in the pieces they came in, finds the
    /// suite across pieces, and leaves the pipeline.
    @Test func observerPassesBytesThroughAndLeaves() throws {
        let observer = ServerHelloObserver()
        let channel = EmbeddedChannel(handler: observer)
        let sent = Self.tls13 + [UInt8](repeating: 0xAB, count: 100)
        for start in stride(from: 0, to: sent.count, by: 7) {
            try channel.writeInbound(ByteBuffer(bytes: sent[start..<min(sent.count, start + 7)]))
        }
        var received: [UInt8] = []
        while let piece = try channel.readInbound(as: ByteBuffer.self) { received += piece.readableBytesView }
        #expect(received == sent)
        #expect(observer.cipherSuite == 0x1301)
        #expect(throws: (any Error).self) { try channel.pipeline.syncOperations.context(handlerType: ServerHelloObserver.self) }
        _ = try channel.finish()
    }
}
