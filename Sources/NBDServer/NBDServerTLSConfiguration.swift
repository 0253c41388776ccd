@_spi(NBDMachines) import NBDCore

/// TLS for the server, in nbdkit's words (`--tls`, `--tls-certificates`, `--tls-psk`,
/// `--tls-verify-peer`), with an allow-list of client identities as qemu's `tls-authz` has.
///
/// Credentials are X.509 certificates in a folder laid out as nbdkit and qemu lay them out
/// (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`), or a psktool key file
/// (`username:hexkey` lines). They are read when the server starts: a missing or bad file
/// stops ``NBDServer/start(exports:on:configuration:)`` with an error that names it.
public struct NBDServerTLSConfiguration: Sendable {
    /// Whether TLS is offered, or required.
    public var mode: NBDServerTLSMode
    /// The X.509 credentials folder.
    public var certificates: String?
    /// The psktool key file: TLS-PSK instead of certificates (TLS 1.2, as BoringSSL offers it).
    public var pskFile: String?
    /// Clients must present a certificate signed by the folder's `ca-cert.pem`.
    public var verifyPeer = false
    /// When set, only these clients are served: X.509 subjects as RFC 4514 writes them, most
    /// specific first (`CN=backup,O=Example,C=GB`, as qemu's `tls-authz` names them), or PSK user
    /// names. Any other client is disconnected once its TLS handshake is done, and logged.
    /// With certificates, it needs ``verifyPeer``: an unverified certificate can name anyone;
    /// and it needs ``NBDServerTLSMode/require``: under `on` or `off`, clients in clear would
    /// pass it. A configuration that breaks either is refused when the server starts
    /// (an `NBDError` of code `tlsFailed`): access control fails closed, never ignored.
    public var allowedIdentities: Set<String>?

    /// X.509 from the `certificates` folder, under `mode`.
    public init(mode: NBDServerTLSMode = .require, certificates: String) {
        self.mode = mode
        self.certificates = certificates
    }

    /// TLS-PSK with the keys of `pskFile`, under `mode`.
    public init(mode: NBDServerTLSMode = .require, pskFile: String) {
        self.mode = mode
        self.pskFile = pskFile
    }
}
