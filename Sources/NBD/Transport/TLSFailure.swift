import NIOSSL

/// Why a TLS handshake failed, in words, from what swift-nio-ssl reports: which check failed
/// when it says so, instead of BoringSSL's error stack.
struct TLSFailure: Error, CustomStringConvertible {
    let description: String
    /// The error swift-nio-ssl reported.
    let underlying: any Error

    /// `error` in words; `hostname` is the name the certificate was checked against.
    init(_ error: any Error, hostname: String?) {
        underlying = error
        let text = "\(error)"
        if let extra = error as? NIOSSLExtraError, extra == .failedToValidateHostname {
            description = "the server's certificate is not for \(hostname ?? "the name asked for")"
        } else if text.contains("CERTIFICATE_VERIFY_FAILED") {
            // BoringSSL does not say which check failed, and swift-nio-ssl passes on no more.
            description = "the server's certificate could not be verified: not signed by a trusted CA, expired or not yet valid"
        } else if text.contains("ALERT_UNKNOWN_CA") || text.contains("ALERT_BAD_CERTIFICATE")
            || text.contains("ALERT_CERTIFICATE_REQUIRED") || text.contains("ALERT_CERTIFICATE_EXPIRED")
        {
            description = "the server refused this client's certificate, or wanted one"
        } else if text.contains("UNKNOWN_PSK_IDENTITY") || text.contains("DECRYPT_ERROR") || text.contains("BAD_RECORD_MAC") {
            description = "the server did not accept the pre-shared key or its user name"
        } else if text.contains("EOF during handshake") || (error as? NIOSSLError) == .uncleanShutdown {
            description =
                "the server closed the connection during the handshake: a wrong pre-shared key or user name, "
                + "or a client certificate it refused"
        } else if text.contains("WRONG_VERSION_NUMBER") || text.contains("NO_SHARED_CIPHER") || text.contains("UNSUPPORTED_PROTOCOL") {
            description = "the server and this client have no TLS version or cipher in common"
        } else {
            description = "the TLS library reported \(text)"
        }
    }
}
