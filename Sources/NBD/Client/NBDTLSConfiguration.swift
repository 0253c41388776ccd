import Foundation
import NIOSSL
import NBDCore

/// How a client uses TLS (`NBD_OPT_STARTTLS`, "TLS support"), with libnbd's three policies.
///
/// X.509 is supported: the server certificate is verified by default (against the system trust
/// store, or the CA you give) for the host name of the URI or ``hostname``; a client
/// certificate can be presented. TLS-PSK is not supported yet.
public struct NBDTLSConfiguration: Sendable {
    /// Whether TLS is used.
    public enum Policy: Sendable, Hashable {
        /// Never TLS: no STARTTLS is sent (`nbd://` by default).
        case disable
        /// Try STARTTLS; go on in clear only if the server says it has no TLS.
        case allow
        /// TLS or nothing (`nbds://`): a server that refuses is left at once, with nothing sent in clear.
        case require
    }

    public var policy: Policy
    /// A PEM file of CA certificates to trust; nil uses the system trust store.
    public var caCertificateFile: String?
    /// A PEM client certificate (chain) for servers that verify clients.
    public var clientCertificateFile: String?
    /// The PEM private key of ``clientCertificateFile``.
    public var clientKeyFile: String?
    /// The name the server certificate must carry; nil uses the URI's host.
    public var hostname: String?
    /// Verify the server's certificate and name (on by default).
    public var verifyPeer = true

    /// A configuration with `policy` and default verification.
    public init(policy: Policy = .disable) {
        self.policy = policy
    }

    /// What a URI asks for: `nbds://` requires TLS; `tls-certificates=DIR` names a directory
    /// with `ca-cert.pem` (and `client-cert.pem`, `client-key.pem` when present), the layout
    /// nbdkit, qemu and libnbd share; `tls-hostname` and `tls-verify-peer` as named.
    public init(uri: NBDURI) throws {
        self.init(policy: uri.requiresTLS ? .require : .disable)
        if uri.tlsPSKFile != nil || uri.tlsType == "psk" {
            throw NBDError(.tlsRequired, "TLS-PSK is not supported yet; use X.509 certificates", connectionUsable: false)
        }
        if let directory = uri.tlsCertificates {
            let file = { (name: String) in URL(fileURLWithPath: directory).appendingPathComponent(name).path }
            caCertificateFile = file("ca-cert.pem")
            if FileManager.default.fileExists(atPath: file("client-cert.pem")) {
                clientCertificateFile = file("client-cert.pem")
                clientKeyFile = file("client-key.pem")
            }
        }
        hostname = uri.tlsHostname ?? (uri.isUnix ? nil : uri.host)
        verifyPeer = uri.tlsVerifyPeer ?? true
    }

    func makeContext() throws -> NIOSSLContext {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.minimumTLSVersion = .tlsv12
        tls.certificateVerification = verifyPeer ? .fullVerification : .none
        if let caCertificateFile {
            tls.trustRoots = .file(caCertificateFile)
        }
        if let clientCertificateFile, let clientKeyFile {
            tls.certificateChain = try NIOSSLCertificate.fromPEMFile(clientCertificateFile).map { .certificate($0) }
            tls.privateKey = .privateKey(try NIOSSLPrivateKey(file: clientKeyFile, format: .pem))
        }
        return try NIOSSLContext(configuration: tls)
    }
}
