import Foundation
@_spi(NBDMachines) import NBDCore
import NBDTLS
import NIOSSL

/// How a client uses TLS (`NBD_OPT_STARTTLS`, "TLS support"), with libnbd's three policies.
///
/// X.509: the server certificate is verified by default (against the system trust store, or
/// the CA you give) for the host name of the URI or ``hostname``; a client certificate can be
/// presented. Where there is no name to check (a Unix or vsock socket, or a socket you pass,
/// without ``hostname``), the chain is still verified, and any name is taken.
///
/// TLS-PSK: a key file in psktool's format (`username:hexkey` lines), as nbdkit and qemu use;
/// with swift-nio-ssl (BoringSSL) PSK runs over TLS 1.2.
public struct NBDTLSConfiguration: Sendable {
    /// Whether TLS is used.
    public typealias Policy = NBDTLSPolicy

    public var policy: Policy
    /// A PEM file of CA certificates to trust; nil uses the system trust store.
    public var caCertificateFile: String?
    /// A PEM client certificate (chain) for servers that verify clients.
    public var clientCertificateFile: String?
    /// The PEM private key of ``clientCertificateFile``.
    public var clientKeyFile: String?
    /// The name the server certificate must carry; nil uses the URI's host, and on a socket
    /// with no host (Unix, vsock) checks the chain only.
    public var hostname: String?
    /// Verify the server's certificate and name (on by default).
    public var verifyPeer = true
    /// A PSK file (`username:hexkey` lines): TLS-PSK instead of certificates.
    public var pskFile: String?
    /// The PSK identity to use from ``pskFile``; nil takes the local user name.
    public var pskUsername: String?

    /// A configuration with `policy` and default verification.
    public init(policy: Policy = .disable) {
        self.policy = policy
    }

    /// What a URI asks for: `nbds://` requires TLS; `tls-certificates=DIR` names a directory
    /// with `ca-cert.pem` (and `client-cert.pem`, `client-key.pem` when present), the layout
    /// nbdkit, qemu and libnbd share; `tls-hostname`, `tls-verify-peer`, `tls-psk-file` and
    /// `tls-username` (or the URI's user) as named.
    public init(uri: NBDURI) {
        self.init()
        apply(uri)
    }

    /// Applies what a URI says on top of this configuration: only the parameters it names change.
    public mutating func apply(_ uri: NBDURI) {
        if uri.requiresTLS { policy = .require }
        if let directory = uri.tlsCertificates { useCertificates(in: directory) }
        if let name = uri.tlsHostname { hostname = name }
        if let verify = uri.tlsVerifyPeer { verifyPeer = verify }
        if let file = uri.tlsPSKFile { pskFile = file }
        if let user = uri.tlsUsername ?? uri.user { pskUsername = user }
    }

    /// Takes the certificates from a directory in the layout nbdkit, qemu and libnbd share:
    /// `ca-cert.pem` to trust, and `client-cert.pem` with `client-key.pem` when they exist.
    public mutating func useCertificates(in directory: String) {
        caCertificateFile = TLSFiles.path(.caCertificate, in: directory)
        if FileManager.default.fileExists(atPath: TLSFiles.path(.clientCertificate, in: directory)) {
            clientCertificateFile = TLSFiles.path(.clientCertificate, in: directory)
            clientKeyFile = TLSFiles.path(.clientKey, in: directory)
        }
    }

    /// The client's TLS context; `checkingName` when there is a name for the certificate to carry.
    func makeContext(checkingName: Bool) throws -> NIOSSLContext {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.minimumTLSVersion = .tlsv12
        if let pskFile {
            let (identity, key) = try Self.loadPSK(pskFile, username: pskUsername ?? NSUserName())
            tls.pskClientProvider = { _ in PSKClientIdentityResponse(key: NIOSSLSecureBytes(key), identity: identity) }
            tls.maximumTLSVersion = .tlsv12
            tls.cipherSuiteValues = TLSFiles.pskCipherSuites
            tls.certificateVerification = .none
            return try NIOSSLContext(configuration: tls)
        }
        switch (verifyPeer, checkingName) {
        case (false, _): tls.certificateVerification = .none
        case (true, true): tls.certificateVerification = .fullVerification
        // A Unix socket has no host name: the chain is checked against the CA, not the name.
        case (true, false): tls.certificateVerification = .noHostnameVerification
        }
        // A missing file named in words, not as the TLS library's "noSuchFilesystemObject".
        for (what, path) in [
            ("CA certificate", caCertificateFile), ("client certificate", clientCertificateFile), ("client key", clientKeyFile),
        ] {
            if let path { try TLSFiles.requireReadable(path, as: what) }
        }
        if let caCertificateFile {
            tls.trustRoots = .file(caCertificateFile)
        }
        if let clientCertificateFile, let clientKeyFile {
            tls.certificateChain = try NIOSSLCertificate.fromPEMFile(clientCertificateFile).map { .certificate($0) }
            tls.privateKey = .privateKey(try NIOSSLPrivateKey(file: clientKeyFile, format: .pem))
        }
        return try NIOSSLContext(configuration: tls)
    }

    /// Reads the key of `username` from a psktool file.
    static func loadPSK(_ path: String, username: String) throws -> (String, [UInt8]) {
        (username, try PSKFile.key(of: username, in: try TLSFiles.pskText(path), path: path))
    }
}
