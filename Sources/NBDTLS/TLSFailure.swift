import NIOSSL

/// Why a TLS handshake failed, in words, from what swift-nio-ssl reports: which check failed
/// when it says so, instead of BoringSSL's error stack. The client puts it in its error; the
/// server in its log.
package struct TLSFailure: Error, CustomStringConvertible {
    /// Which end of the connection this program is.
    package enum Side: Sendable {
        /// A client, which checked the server's certificate against `hostname`.
        case client(hostname: String?)
        case server
    }

    package let description: String
    /// The error swift-nio-ssl reported.
    package let underlying: any Error

    package init(_ error: any Error, side: Side) {
        underlying = error
        let text = "\(error)"
        let (we, peer) = if case .server = side { ("server", "client") } else { ("client", "server") }
        if let extra = error as? NIOSSLExtraError, extra == .failedToValidateHostname, case .client(let hostname) = side {
            description = "the server's certificate is not for \(hostname ?? "the name asked for")"
        } else if text.contains("CERTIFICATE_VERIFY_FAILED") {
            // BoringSSL does not say which check failed, and swift-nio-ssl passes on no more.
            description = "the \(peer)'s certificate could not be verified: not signed by a trusted CA, expired or not yet valid"
        } else if text.contains("PEER_DID_NOT_RETURN_A_CERTIFICATE") {
            description = "the \(peer) sent no certificate, and this \(we) requires one"
        } else if text.contains("ALERT_UNKNOWN_CA") || text.contains("ALERT_BAD_CERTIFICATE")
            || text.contains("ALERT_CERTIFICATE_REQUIRED") || text.contains("ALERT_CERTIFICATE_EXPIRED")
        {
            description =
                if case .server = side { "the client refused this server's certificate" } else {
                    "the server refused this client's certificate, or wanted one"
                }
        } else if text.contains("PSK_IDENTITY_NOT_FOUND") {
            description = "the \(peer)'s user name is not in this \(we)'s pre-shared key file"
        } else if text.contains("UNKNOWN_PSK_IDENTITY") || text.contains("DECRYPT_ERROR") || text.contains("BAD_RECORD_MAC") {
            description =
                if case .server = side { "the client's pre-shared key or user name is not this server's" } else {
                    "the server did not accept the pre-shared key or its user name"
                }
        } else if text.contains("EOF during handshake") || (error as? NIOSSLError) == .uncleanShutdown {
            description =
                if case .server = side {
                    "the client closed the connection during the handshake: it may not accept this server's certificate or key"
                } else {
                    "the server closed the connection during the handshake: a wrong pre-shared key or user name, "
                        + "or a client certificate it refused"
                }
        } else if text.contains("WRONG_VERSION_NUMBER") || text.contains("NO_SHARED_CIPHER") || text.contains("UNSUPPORTED_PROTOCOL") {
            description = "the \(peer) and this \(we) have no TLS version or cipher in common"
        } else {
            description = "the TLS library reported \(text)"
        }
    }
}
