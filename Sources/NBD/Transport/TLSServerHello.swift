import NIOCore

/// Where the cipher suite sits in the first TLS record a server sends (RFC 5246 §7.4.1.3 and
/// RFC 8446 §4.1.3, which keep the same layout; a HelloRetryRequest too).
package enum TLSServerHello {
    package enum Parse: Equatable {
        case needMore
        case found(UInt16)
        case notServerHello
    }

    /// Record header 5, handshake header 4, version 2, random 32, session id 1 + 32, suite 2.
    static let longestPrefix = 78

    package static func cipherSuite(in bytes: ByteBuffer) -> Parse {
        var bytes = bytes
        // TLSPlaintext: type handshake (22), version, length.
        guard let type = bytes.readInteger(as: UInt8.self) else { return .needMore }
        guard type == 22 else { return .notServerHello }
        guard bytes.readSlice(length: 2) != nil, let recordLength = bytes.readInteger(as: UInt16.self) else { return .needMore }
        // Handshake: msg_type server_hello (2), length (24 bits).
        guard let messageType = bytes.readInteger(as: UInt8.self) else { return .needMore }
        guard messageType == 2 else { return .notServerHello }
        guard bytes.readSlice(length: 3) != nil, bytes.readSlice(length: 2 + 32) != nil,
            let sessionIDLength = bytes.readInteger(as: UInt8.self)
        else { return .needMore }
        guard sessionIDLength <= 32 else { return .notServerHello }
        // A ServerHello split across records is legal but unheard of; it is not followed.
        guard Int(recordLength) >= 4 + 2 + 32 + 1 + Int(sessionIDLength) + 2 else { return .notServerHello }
        guard bytes.readSlice(length: Int(sessionIDLength)) != nil, let suite = bytes.readInteger(as: UInt16.self) else { return .needMore }
        return .found(suite)
    }

    /// The IANA name of the suites BoringSSL negotiates, or the code point in hex.
    package static func name(of suite: UInt16) -> String {
        names[suite] ?? "0x" + String(suite, radix: 16, uppercase: true)
    }

    private static let names: [UInt16: String] = [
        0x002F: "TLS_RSA_WITH_AES_128_CBC_SHA",
        0x0035: "TLS_RSA_WITH_AES_256_CBC_SHA",
        0x008C: "TLS_PSK_WITH_AES_128_CBC_SHA",
        0x008D: "TLS_PSK_WITH_AES_256_CBC_SHA",
        0x009C: "TLS_RSA_WITH_AES_128_GCM_SHA256",
        0x009D: "TLS_RSA_WITH_AES_256_GCM_SHA384",
        0x1301: "TLS_AES_128_GCM_SHA256",
        0x1302: "TLS_AES_256_GCM_SHA384",
        0x1303: "TLS_CHACHA20_POLY1305_SHA256",
        0xC009: "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
        0xC00A: "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
        0xC013: "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
        0xC014: "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
        0xC02B: "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        0xC02C: "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        0xC02F: "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        0xC030: "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        0xC035: "TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA",
        0xC036: "TLS_ECDHE_PSK_WITH_AES_256_CBC_SHA",
        0xCCA8: "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        0xCCA9: "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        0xCCAC: "TLS_ECDHE_PSK_WITH_CHACHA20_POLY1305_SHA256",
    ]
}
