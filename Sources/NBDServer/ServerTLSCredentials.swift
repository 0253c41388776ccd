@_spi(NBDMachines) import NBDCore
import NBDTLS
import NIOConcurrencyHelpers
import NIOSSL

/// The server's TLS credentials, read once at start: what each connection's TLS handler is
/// made from, and how the client's identity is learnt once its handshake is done.
struct ServerTLSCredentials: Sendable {
    private enum Kind: Sendable {
        case certificates(NIOSSLContext)
        case psk(keys: [String: [UInt8]])
    }

    private let kind: Kind

    /// The credentials `configuration` asks for, nil when TLS is off. Access control fails
    /// closed: an allow-list or a client certificate to verify cannot be enforced with TLS off
    /// (clients in clear have no identity), so that is refused rather than ignored.
    static func read(_ configuration: NBDServerTLSConfiguration?) throws -> ServerTLSCredentials? {
        guard let configuration else { return nil }
        guard configuration.mode == .off else { return try ServerTLSCredentials(configuration) }
        if configuration.allowedIdentities != nil {
            throw refuse("an allow-list cannot be enforced with TLS off: clients in clear would be served; require TLS")
        }
        if configuration.verifyPeer { throw refuse("verifying the client's certificate needs TLS, which is off") }
        return nil
    }

    private static func refuse(_ message: String) -> NBDError { NBDError(.tlsFailed, message, connectionUsable: false) }

    /// Reads and checks `configuration`'s files; throws `tlsFailed`, naming what is wrong.
    init(_ configuration: NBDServerTLSConfiguration) throws {
        let refuse = Self.refuse
        guard configuration.mode != .off else { throw refuse("TLS is off: no credentials are needed") }
        if configuration.allowedIdentities != nil, configuration.mode != .require {
            throw refuse("an allow-list needs TLS required: under on, clients in clear would pass it")
        }
        switch (configuration.certificates, configuration.pskFile) {
        case (nil, nil):
            throw refuse("TLS needs credentials: a certificates folder or a PSK file")
        case (.some, .some):
            throw refuse("TLS takes a certificates folder or a PSK file, not both")
        case (nil, let pskFile?):
            guard !configuration.verifyPeer else { throw refuse("verifying the client's certificate needs certificates, not a PSK file") }
            kind = .psk(keys: try PSKFile.keys(in: try TLSFiles.pskText(pskFile), path: pskFile))
        case (let folder?, nil):
            if configuration.allowedIdentities != nil, !configuration.verifyPeer {
                throw refuse(
                    "an allow-list of certificate subjects needs the client's certificate verified: an unverified one can name anyone"
                )
            }
            kind = .certificates(try Self.context(folder: folder, verifyPeer: configuration.verifyPeer))
        }
    }

    private static func context(folder: String, verifyPeer: Bool) throws -> NIOSSLContext {
        let (certificate, key, ca) = (
            TLSFiles.path(.serverCertificate, in: folder), TLSFiles.path(.serverKey, in: folder), TLSFiles.path(.caCertificate, in: folder)
        )
        try TLSFiles.requireReadable(certificate, as: "server certificate")
        try TLSFiles.requireReadable(key, as: "server key")
        if verifyPeer { try TLSFiles.requireReadable(ca, as: "CA certificate") }
        do {
            var tls = TLSConfiguration.makeServerConfiguration(
                certificateChain: try NIOSSLCertificate.fromPEMFile(certificate).map { .certificate($0) },
                privateKey: .privateKey(try NIOSSLPrivateKey(file: key, format: .pem))
            )
            tls.minimumTLSVersion = .tlsv12
            if verifyPeer {
                // A client certificate is required ("SSL_VERIFY_FAIL_IF_NO_PEER_CERT") and must
                // chain to the folder's CA.
                tls.certificateVerification = .noHostnameVerification
                tls.trustRoots = .file(ca)
            } else {
                tls.certificateVerification = .none
            }
            return try NIOSSLContext(configuration: tls)
        } catch {
            throw NBDError(.tlsFailed, "cannot load the certificates of \(folder): \(error)", connectionUsable: false)
        }
    }

    /// A TLS handler for one connection; `identity` learns the PSK user name it negotiates.
    func makeHandler(recording identity: PSKIdentity) throws -> NIOSSLServerHandler {
        switch kind {
        case .certificates(let context):
            return NIOSSLServerHandler(context: context)
        case .psk(let keys):
            var tls = TLSConfiguration.makePreSharedKeyConfiguration()
            tls.minimumTLSVersion = .tlsv12
            tls.maximumTLSVersion = .tlsv12
            tls.cipherSuiteValues = TLSFiles.pskCipherSuites
            tls.certificateVerification = .none
            tls.pskServerProvider = { context in
                // An unknown user fails the handshake (the client sees a bad record MAC or an
                // unknown PSK identity alert).
                guard let key = keys[context.clientIdentity] else {
                    throw NBDError(.tlsFailed, "unknown PSK user", connectionUsable: false)
                }
                identity.name = context.clientIdentity
                return PSKServerIdentityResponse(key: NIOSSLSecureBytes(key))
            }
            return NIOSSLServerHandler(context: try NIOSSLContext(configuration: tls))
        }
    }

    /// The identity of the client of a handshake just done: the PSK user, or the subject of
    /// its verified certificate.
    func identity(of handler: NIOSSLServerHandler?, psk: PSKIdentity) -> String? {
        switch kind {
        case .psk: psk.name
        case .certificates: handler?.peerCertificate.map { Self.distinguishedName($0.subjectName) }
        }
    }

    /// RFC 4514's string of a name: its parts most specific first, `,` and `\` escaped.
    static func distinguishedName(_ parts: [SSLCertificateName]) -> String {
        let types: [(SSLCertificateNameType, String)] = [
            (.commonName, "CN"), (.organization, "O"), (.organizationalUnit, "OU"), (.city, "L"), (.state, "ST"),
            (.country, "C"), (.emailAddress, "emailAddress"), (.userId, "UID"),
        ]
        return parts.reversed().map { part in
            let type = types.first { $0.0 == part.type }?.1 ?? "?"
            var value = ""
            for character in part.value {
                if ",+\"\\<>;=".contains(character) { value.append("\\") }
                value.append(character)
            }
            return "\(type)=\(value)"
        }.joined(separator: ",")
    }
}

/// The PSK user name a connection's handshake negotiated, set by BoringSSL's callback.
final class PSKIdentity: Sendable {
    private let value = NIOLockedValueBox<String?>(nil)

    var name: String? {
        get { value.withLockedValue { $0 } }
        set { value.withLockedValue { $0 = newValue } }
    }
}
