import Foundation
import NBD
import NIOCore
import TestSupport
import Testing

/// TLS (X.509) against nbdkit, with certificates made by the test with openssl.
@Suite("TLS against nbdkit", .serialized)
struct TLSTests {
    /// A CA, a server certificate for `localhost` signed by it, and client folders in the layout
    /// nbdkit, qemu and libnbd share. `other` holds a CA that signed nothing here.
    func makeCertificates(_ folder: ServerProcess) throws -> (server: String, client: String, other: String) {
        try makeAllCertificates(folder).base
    }

    /// Also an expired server certificate (`expired/`) and a client identity (`identity/`).
    func makeAllCertificates(
        _ folder: ServerProcess
    ) throws -> (base: (server: String, client: String, other: String), expired: String, identity: String) {
        let script = """
            set -e
            mkdir -p server client other
            openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca-cert.pem -days 2 -subj "/CN=Test CA" 2>/dev/null
            openssl req -newkey rsa:2048 -nodes -keyout server/server-key.pem -out server.csr -subj "/CN=localhost" 2>/dev/null
            printf "subjectAltName=DNS:localhost\\nbasicConstraints=CA:FALSE\\n" > ext.cnf
            openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
            -out server/server-cert.pem -days 2 -extfile ext.cnf 2>/dev/null
            cp ca-cert.pem server/ca-cert.pem
            cp ca-cert.pem client/ca-cert.pem
            openssl req -x509 -newkey rsa:2048 -nodes -keyout other-key.pem -out other/ca-cert.pem -days 2 -subj "/CN=Other CA" 2>/dev/null
            mkdir -p expired identity
            cp ca-cert.pem expired/ca-cert.pem
            cp server/server-key.pem expired/server-key.pem
            openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
            -out expired/server-cert.pem -days -1 -extfile ext.cnf 2>/dev/null
            cp ca-cert.pem identity/ca-cert.pem
            openssl req -newkey rsa:2048 -nodes -keyout identity/client-key.pem -out client.csr \
            -subj "/CN=swift-nbd test client" 2>/dev/null
            openssl x509 -req -in client.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
            -out identity/client-cert.pem -days 2 2>/dev/null
            """
        _ = try folder.run("sh", ["-c", script])
        return ((folder.path("server"), folder.path("client"), folder.path("other")), folder.path("expired"), folder.path("identity"))
    }

    func tlsURI(_ socket: String, certificates: String, hostname: String = "localhost") throws -> NBDURI {
        try NBDURI("nbds+unix:///?socket=\(socket)&tls-certificates=\(certificates)&tls-hostname=\(hostname)")
    }

    @Test func requiredTLSRoundTripAndBlockStatus() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let certificates = try makeCertificates(folder)
        let plain = try await folder.nbdkit(["--tls=require", "--tls-certificates", certificates.server, "memory", "16M"])
        let uri = try tlsURI(try plain.socketPath, certificates: certificates.client)
        let connection = try await NBDConnection.connect(to: uri, configuration: .filesFromURIs)
        #expect(await connection.isTLS)
        await connection.abort()
        let export = try await NBDExport.connect(to: uri, configuration: .filesFromURIs)
        #expect(export.tlsVersion?.hasPrefix("tlsv1") == true, "\(export.tlsVersion ?? "none")")
        // GnuTLS and BoringSSL agree on one of TLS 1.3's suites.
        #expect(
            ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"].contains(export.tlsCipherSuite ?? "none"),
            "\(export.tlsCipherSuite ?? "none")"
        )
        let data = pattern(1 << 20, seed: 21)
        try await export.write(data, at: 65536)
        #expect(try await export.read(at: 65536, length: 1 << 20) == data)
        let status = try await export.blockStatus(at: 0, length: 16 << 20)
        #expect(status["base:allocation"]?.isEmpty == false)
        await export.disconnect()
    }

    @Test func untrustedCertificateIsRefused() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let certificates = try makeCertificates(folder)
        let plain = try await folder.nbdkit(["--tls=require", "--tls-certificates", certificates.server, "memory", "16M"])
        await #expect {
            _ = try await NBDExport.connect(
                to: try tlsURI(try plain.socketPath, certificates: certificates.other),
                configuration: .filesFromURIs
            )
        } throws: {
            ($0 as? NBDError)?.code == .tlsFailed
                && "\($0)".hasPrefix("the TLS handshake failed: the server's certificate could not be verified")
        }
    }

    @Test func wrongHostnameIsRefused() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let certificates = try makeCertificates(folder)
        let plain = try await folder.nbdkit(["--tls=require", "--tls-certificates", certificates.server, "memory", "16M"])
        await #expect {
            _ = try await NBDExport.connect(
                to: try tlsURI(try plain.socketPath, certificates: certificates.client, hostname: "example.com"),
                configuration: .filesFromURIs
            )
        } throws: { "\($0)" == "the TLS handshake failed: the server's certificate is not for example.com" }
    }

    @Test func requiredTLSAgainstAServerWithoutItSendsNothingInClear() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let certificates = try makeCertificates(folder)
        let plain = try await folder.nbdkit(["--verbose", "memory", "16M"])
        await #expect {
            _ = try await NBDExport.connect(
                to: try tlsURI(try plain.socketPath, certificates: certificates.client),
                configuration: .filesFromURIs
            )
        } throws: {
            ($0 as? NBDError)?.code == .tlsRequired
        }
        // nbdkit has seen the whole conversation once it logs the client's hang-up.
        try await waitUntil(file: folder.path("nbdkit.log"), holds: "client closed input socket")
        let log = try String(contentsOfFile: folder.path("nbdkit.log"), encoding: .utf8)
        #expect(log.contains("STARTTLS"))
        #expect(!log.contains("NBD_OPT_GO") && !log.contains("NBD_OPT_EXPORT_NAME") && !log.contains("NBD_OPT_INFO"))
    }

    @Test func allowUsesTLSWhenOfferedAndClearOtherwise() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let certificates = try makeCertificates(folder)
        var configuration = NBDClientConfiguration()
        configuration.tls = NBDTLSConfiguration(policy: .allow)
        configuration.tls.caCertificateFile = certificates.client + "/ca-cert.pem"
        configuration.tls.hostname = "localhost"
        let offered = try await folder.nbdkit(["--tls=on", "--tls-certificates", certificates.server, "memory", "16M"])
        let encrypted = try await NBDConnection.connect(to: offered.address, configuration: configuration)
        #expect(await encrypted.isTLS)
        await encrypted.abort()

        let other = try ServerProcess()
        defer { other.stop() }
        let clear = try await other.nbdkit(["memory", "16M"])
        let connection = try await NBDConnection.connect(to: clear.address, configuration: configuration)
        #expect(!(await connection.isTLS))
        let export = try await connection.go()
        #expect(export.size == 16 << 20)
        await export.disconnect()
    }
}

extension TLSTests {
    @Test func expiredCertificateIsRefused() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let certificates = try makeAllCertificates(folder)
        let plain = try await folder.nbdkit(["--tls=require", "--tls-certificates", certificates.expired, "memory", "16M"])
        await #expect {
            _ = try await NBDExport.connect(
                to: try tlsURI(try plain.socketPath, certificates: certificates.base.client),
                configuration: .filesFromURIs
            )
        } throws: { ($0 as? NBDError)?.code == .tlsFailed && "\($0)".contains("expired or not yet valid") }
    }

    @Test func serverThatVerifiesClientsNeedsAClientCertificate() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let certificates = try makeAllCertificates(folder)
        let plain = try await folder.nbdkit([
            "--tls=require", "--tls-verify-peer", "--tls-certificates", certificates.base.server, "memory", "16M",
        ])
        let export = try await NBDExport.connect(
            to: try tlsURI(try plain.socketPath, certificates: certificates.identity),
            configuration: .filesFromURIs
        )
        try await export.write(pattern(4096, seed: 1), at: 0)
        await export.disconnect()
        await #expect(throws: NBDError.self) {
            _ = try await NBDExport.connect(
                to: try tlsURI(try plain.socketPath, certificates: certificates.base.client),
                configuration: .filesFromURIs
            )
        }
    }

    @Test func qemuNbdWithX509() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let certificates = try makeCertificates(folder)
        _ = try folder.run("qemu-img", ["create", "-f", "raw", folder.path("disk.raw"), "16M"])
        let socket = folder.path("qemu.sock")
        try await folder.start(
            "qemu-nbd",
            [
                "--object", "tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir=\(certificates.server)", "--tls-creds", "tls0",
                "-f", "raw", "-k", socket, "-x", "disk", "-t", folder.path("disk.raw"),
            ],
            waitFor: socket
        )
        let uri = try NBDURI("nbds+unix:///disk?socket=\(socket)&tls-certificates=\(certificates.client)&tls-hostname=localhost")
        let export = try await NBDExport.connect(to: uri, configuration: .filesFromURIs)
        let data = pattern(1 << 20, seed: 30)
        try await export.write(data, at: 1 << 20)
        #expect(try await export.read(at: 1 << 20, length: 1 << 20) == data)
        await export.disconnect()
    }

    @Test func thousandConcurrentRequestsOverTLS() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let certificates = try makeCertificates(folder)
        let plain = try await folder.nbdkit(["--tls=require", "--tls-certificates", certificates.server, "memory", "64M"])
        let export = try await NBDExport.connect(
            to: try tlsURI(try plain.socketPath, certificates: certificates.client),
            configuration: .filesFromURIs
        )
        try await thousandRequestsFromSixteenTasks(export)
        await export.disconnect()
    }

    @Test func nbdInfoOverTLS() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let certificates = try makeCertificates(folder)
        let plain = try await folder.nbdkit(["--tls=require", "--tls-certificates", certificates.server, "memory", "16M"])
        let uri = try tlsURI(try plain.socketPath, certificates: certificates.client).description
        let result = try runNBD(["info", "--json", uri])
        #expect(result.status == 0, "\(result.error)")
        #expect(result.output.contains("\"TLS\": true"))
        #expect(try runNBD(["info", "--is", "tls", uri]).status == 0)
    }
}

extension TLSTests {
    @Test func pskWorksWithTheRightKeyOnly() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let key = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
        try "alice:\(key)\n".write(toFile: folder.path("server.psk"), atomically: true, encoding: .utf8)
        try "alice:ff\(key.dropFirst(2))\nbob:\(key)\n".write(toFile: folder.path("wrong.psk"), atomically: true, encoding: .utf8)
        let plain = try await folder.nbdkit(["--tls=require", "--tls-psk", folder.path("server.psk"), "memory", "16M"])
        let socket = try plain.socketPath
        let export = try await NBDExport.connect(
            to: try NBDURI("nbds+unix://alice@/?socket=\(socket)&tls-psk-file=\(folder.path("server.psk"))"),
            configuration: .filesFromURIs
        )
        #expect(export.tlsVersion != nil)
        #expect(export.tlsCipherSuite?.contains("_PSK_") == true, "\(export.tlsCipherSuite ?? "none")")
        let data = pattern(65536, seed: 44)
        try await export.write(data, at: 0)
        #expect(try await export.read(at: 0, length: 65536) == data)
        await export.disconnect()
        // A wrong key, and a user the server does not know: both refused by the handshake.
        for user in ["alice", "bob"] {
            let uri = try NBDURI("nbds+unix:///?socket=\(socket)&tls-psk-file=\(folder.path("wrong.psk"))&tls-username=\(user)")
            await #expect { _ = try await NBDExport.connect(to: uri, configuration: .filesFromURIs) } throws: {
                ($0 as? NBDError)?.code == .tlsFailed && "\($0)".contains("a wrong pre-shared key or user name")
            }
        }
    }
}

extension TLSTests {
    @Test func verificationCanBeTurnedOffExplicitly() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let certificates = try makeCertificates(folder)
        let plain = try await folder.nbdkit(["--tls=require", "--tls-certificates", certificates.server, "memory", "16M"])
        // Signed by a CA we do not trust: refused unless tls-verify-peer=0.
        let uri = try NBDURI("nbds+unix:///?socket=\(try plain.socketPath)&tls-certificates=\(certificates.other)&tls-verify-peer=0")
        let export = try await NBDExport.connect(to: uri, configuration: .filesFromURIs)
        #expect(export.tlsVersion != nil)
        await export.disconnect()
    }

    @Test func tlsFallbackFilterServesRealDataOnlyOverTLS() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let certificates = try makeCertificates(folder)
        let plain = try await folder.nbdkit([
            "--tls=on", "--tls-certificates", certificates.server, "--filter=tls-fallback", "memory", "16M",
        ])
        // In clear, the filter answers with its small read-only notice instead of the disk.
        let clear = try await NBDExport.connect(to: plain, configuration: .filesFromURIs)
        #expect(clear.size < 16 << 20)
        #expect(clear.info.isReadOnly)
        await clear.disconnect()
        // Required TLS reaches the disk.
        let secure = try await NBDExport.connect(
            to: try tlsURI(try plain.socketPath, certificates: certificates.client),
            configuration: .filesFromURIs
        )
        #expect(secure.size == 16 << 20)
        #expect(!secure.info.isReadOnly)
        await secure.disconnect()
    }
}

extension TLSTests {
    /// A Unix socket has no host name: without `tls-hostname` the certificate's chain is
    /// checked against the CA and any name is taken (nbdinfo connects too); a foreign CA is
    /// still refused, and a `tls-hostname` is still checked.
    @Test func x509OverAUnixSocketChecksTheChainAndTheNameOnlyWhenGiven() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let certificates = try makeCertificates(folder)
        let plain = try await folder.nbdkit(["--tls=require", "--tls-certificates", certificates.server, "memory", "16M"])
        let socket = try plain.socketPath
        func uri(_ directory: String) throws -> NBDURI { try NBDURI("nbds+unix:///?socket=\(socket)&tls-certificates=\(directory)") }
        let export = try await NBDExport.connect(to: uri(certificates.client), configuration: .filesFromURIs)
        let data = pattern(65536, seed: 73)
        try await export.write(data, at: 4096)
        #expect(try await export.read(at: 4096, length: 65536) == data)
        await export.disconnect()
        let info = try runNBD(["info", "--size", uri(certificates.client).description])
        #expect(info.status == 0 && info.output == "16777216\n", "\(info.error)")
        #expect(try folder.run("nbdinfo", ["--size", uri(certificates.client).description]) == Data("16777216\n".utf8))
        await #expect {
            _ = try await NBDExport.connect(to: uri(certificates.other), configuration: .filesFromURIs)
        } throws: {
            "\($0)".hasPrefix("the TLS handshake failed: the server's certificate could not be verified")
        }
        await #expect {
            _ = try await NBDExport.connect(
                to: tlsURI(socket, certificates: certificates.client, hostname: "example.com"),
                configuration: .filesFromURIs
            )
        } throws: { "\($0)" == "the TLS handshake failed: the server's certificate is not for example.com" }
    }
}

extension TLSTests {
    @Test func nbdToolFlagsForTLS() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let certificates = try makeCertificates(folder)
        let plain = try await folder.nbdkit(["--tls=require", "--tls-certificates", certificates.server, "memory", "16M"])
        // nbd:// with --tls-certificates: TLS required; tls-hostname makes the name checked too.
        let uri = "nbd+unix:///?socket=\(try plain.socketPath)&tls-hostname=localhost"
        let result = try runNBD(["info", "--is", "tls", "--tls-certificates", certificates.client, uri])
        #expect(result.status == 0, "\(result.error)")
        let copy = try runNBD(["copy", "pattern:1M", uri, "--tls", "--tls-certificates", certificates.client])
        #expect(copy.status == 0, "\(copy.error)")
        // And back, through the TLS read path of the copy, checked against the pattern itself.
        let back = try runNBD(["copy", uri, folder.path("back.raw"), "--tls", "--tls-certificates", certificates.client])
        #expect(back.status == 0, "\(back.error)")
        #expect(try runNBD(["copy", "pattern:1M", folder.path("pattern.raw")]).status == 0)
        let received = try Data(contentsOf: URL(fileURLWithPath: folder.path("back.raw")))
        #expect(received.prefix(1 << 20) == (try Data(contentsOf: URL(fileURLWithPath: folder.path("pattern.raw")))))
    }
}

extension TLSTests {
    /// A URI may not make the library read local files unless the caller allows it, as libnbd
    /// has it: refused before anything is read or dialled, naming the parameter. The tool allows it.
    @Test func uriFilesNeedTheCallersConsent() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let certificates = try makeCertificates(folder)
        let plain = try await folder.nbdkit(["--tls=require", "--tls-certificates", certificates.server, "memory", "16M"])
        let socket = try plain.socketPath
        for (parameter, uri) in [
            ("tls-certificates", try tlsURI(socket, certificates: certificates.client)),
            ("tls-psk-file", try NBDURI("nbds+unix:///?socket=\(socket)&tls-psk-file=/etc/passwd")),
        ] {
            await #expect { _ = try await NBDExport.connect(to: uri) } throws: { error in
                let error = try #require(error as? NBDError)
                return error.code == .invalidURI && error.message.contains("\(parameter) parameter would read a local file")
            }
        }
        #expect(try runNBD(["info", "--is", "tls", try tlsURI(socket, certificates: certificates.client).description]).status == 0)
    }

    /// A missing certificate file is named, in words.
    @Test func aMissingCertificateIsNamed() throws {
        let result = try runNBD(["info", "nbds+unix:///?socket=/nonexistent/s&tls-certificates=/etc"])
        #expect(result.status == 1)
        #expect(result.error == "nbd: cannot read the CA certificate /etc/ca-cert.pem: No such file or directory\n", "\(result.error)")
    }
}

extension NBDClientConfiguration {
    /// As the `nbd` tool has it: the test's URIs name their certificates and keys.
    static var filesFromURIs: NBDClientConfiguration {
        var configuration = NBDClientConfiguration()
        configuration.uriMayReadLocalFiles = true
        return configuration
    }
}
