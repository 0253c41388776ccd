import NIOCore

/// Whether a listening address serves its exports in clear beyond this host: qemu-nbd and
/// nbdkit document the danger; the server says it where it is seen, when it starts.
enum ClearTextExposure {
    /// The warning for a server listening on `address` with `tls`, or nil: on loopback or a Unix
    /// socket only this host can connect, and with TLS required nobody is served in clear.
    static func warning(listeningOn address: SocketAddress, tls: NBDServerTLSConfiguration?) -> String? {
        guard tls?.mode != .require, !isLocal(address) else { return nil }
        return "serving \(address.ipAddress ?? "\(address)") port \(address.port ?? 0) in clear: any host that can reach it "
            + "can use the exports; require TLS (nbd serve --tls=require with --tls-certificates or --tls-psk; "
            + "NBDServerTLSConfiguration mode .require), or listen on loopback or a Unix socket"
    }

    /// Loopback (127.0.0.0/8, ::1, and 127.0.0.0/8 mapped into IPv6) or a Unix socket.
    static func isLocal(_ address: SocketAddress) -> Bool {
        switch address {
        case .unixDomainSocket: return true
        case .v4: return address.ipAddress?.hasPrefix("127.") == true
        case .v6:
            guard let text = address.ipAddress?.lowercased() else { return false }
            return text == "::1" || text.hasPrefix("::ffff:127.")
        }
    }

    /// The loopback address of a wildcard address's family ("0.0.0.0" → "127.0.0.1", "::" →
    /// "::1"): where a client on this host reaches a server bound to every address.
    static func loopback(forWildcard host: String) -> String? {
        switch host {
        case "0.0.0.0": "127.0.0.1"
        case "::", "0:0:0:0:0:0:0:0": "::1"
        default: nil
        }
    }
}
