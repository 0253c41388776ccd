import Foundation
@_spi(NBDMachines) import NBDCore
import NIOSSL

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// What the client and the server share about TLS credentials: the file layout nbdkit, qemu
/// and libnbd use, files named in words when they cannot be read, and the cipher suites of
/// TLS-PSK.
package enum TLSFiles {
    /// The files of a credentials folder, as nbdkit's `--tls-certificates` and qemu's
    /// `tls-creds-x509` `dir=` lay them out.
    package enum Name: String {
        case caCertificate = "ca-cert.pem"
        case serverCertificate = "server-cert.pem"
        case serverKey = "server-key.pem"
        case clientCertificate = "client-cert.pem"
        case clientKey = "client-key.pem"
    }

    /// The path of `name` in `folder`.
    package static func path(_ name: Name, in folder: String) -> String {
        URL(fileURLWithPath: folder).appendingPathComponent(name.rawValue).path
    }

    /// Throws, naming `what` and the reason, unless `path` can be read: BoringSSL would say
    /// "noSuchFilesystemObject".
    package static func requireReadable(_ path: String, as what: String) throws(NBDError) {
        guard access(path, R_OK) != 0 else { return }
        let reason = String(cString: strerror(errno))
        throw NBDError(.tlsFailed, "cannot read the \(what) \(path): \(reason)", connectionUsable: false)
    }

    /// The contents of the PSK file at `path`.
    package static func pskText(_ path: String) throws(NBDError) -> String {
        try requireReadable(path, as: "PSK file")
        do {
            return try String(contentsOfFile: path, encoding: .utf8)
        } catch {
            throw NBDError(.tlsFailed, "cannot read the PSK file \(path)", connectionUsable: false, underlying: error)
        }
    }

    /// BoringSSL offers PSK only with the TLS 1.2 PSK cipher suites: a PSK connection is TLS 1.2.
    package static let pskCipherSuites: [NIOTLSCipher] = [
        .TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA, .TLS_ECDHE_PSK_WITH_AES_256_CBC_SHA,
        .TLS_PSK_WITH_AES_128_CBC_SHA, .TLS_PSK_WITH_AES_256_CBC_SHA,
    ]
}
