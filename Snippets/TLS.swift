// docs/Library.md's TLS examples: from a URI, or configured by hand.
import NBD

// snippet.uri
func secureFromURI() async throws -> NBDExport {
    var configuration = NBDClientConfiguration()
    configuration.uriMayReadLocalFiles = true  // this URI is ours, not a user's: it may name files
    return try await NBDExport.connect(
        to: NBDURI("nbds://nbd.example.com/disk?tls-certificates=/etc/pki/nbd"),
        configuration: configuration
    )
}
// snippet.end

// snippet.configuration
func secureByHand() async throws {
    var configuration = NBDClientConfiguration()
    configuration.tls = NBDTLSConfiguration(policy: .require)
    configuration.tls.caCertificateFile = "/etc/pki/nbd/ca-cert.pem"
    configuration.tls.hostname = "nbd.example.com"
    let connection = try await NBDConnection.connect(to: .unix(path: "/run/nbd.sock"), configuration: configuration)
    print(await connection.tlsVersion ?? "in clear")  // e.g. tlsv13; NBDExport.tlsVersion too
    print(await connection.tlsCipherSuite ?? "")  // e.g. TLS_AES_256_GCM_SHA384; NBDExport too
}
// snippet.end
