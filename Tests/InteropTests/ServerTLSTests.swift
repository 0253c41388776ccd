import Foundation
import NBD
@_spi(NBDMachines) import NBDCore
import NIOCore
import TestSupport
import Testing

/// `nbd serve` over TLS, against real clients: nbdinfo, nbdsh, nbdcopy (both ways, compared by
/// content), qemu-io and qemu-img with `tls-creds-x509` and `tls-creds-psk` objects, and our own
/// client; then every refusal a TLS server owes: clients in clear, clients that trust another
/// CA, missing or foreign client certificates, wrong or unknown pre-shared keys, identities not
/// on the allow-list, and credentials that stop `nbd serve` at start.
@Suite("nbd serve over TLS", .serialized)
struct ServerTLSTests {
    /// The certificates of TLSTests (a CA, `server/`, `client/`, `other/` with another CA,
    /// `identity/` with a client certificate "CN=swift-nbd test client"), plus `stranger/`: a
    /// client certificate signed by the other CA, beside the right CA to trust the server.
    func certificates(_ folder: ServerProcess) throws -> (server: String, client: String, other: String, identity: String, stranger: String)
    {
        let made = try TLSTests().makeAllCertificates(folder)
        let script = """
            set -e
            mkdir -p stranger
            cp ca-cert.pem stranger/ca-cert.pem
            openssl req -newkey rsa:2048 -nodes -keyout stranger/client-key.pem -out stranger.csr -subj "/CN=stranger" 2>/dev/null
            openssl x509 -req -in stranger.csr -CA other/ca-cert.pem -CAkey other-key.pem -CAcreateserial \
            -out stranger/client-cert.pem -days 2 2>/dev/null
            """
        _ = try folder.run("sh", ["-c", script])
        return (made.base.server, made.base.client, made.base.other, made.identity, folder.path("stranger"))
    }

    /// `nbd serve` of 64 MiB of memory on a socket of its own, with `options`.
    func serve(_ folder: ServerProcess, _ name: String, _ options: [String]) async throws -> String {
        let socket = folder.path("\(name).sock")
        try await folder.start(nbdTool, ["serve", "--memory", "64M", "--socket", socket] + options, waitFor: socket)
        return socket
    }

    func x509URI(_ socket: String, _ certificates: String) -> String {
        "nbds+unix:///?socket=\(socket)&tls-certificates=\(certificates)&tls-hostname=localhost"
    }

    /// Runs a tool that may fail: its exit status and what it printed.
    func attempt(_ folder: ServerProcess, _ tool: String, _ arguments: [String]) throws -> (status: Int32, output: String, error: String) {
        let (executable, full) = try ServerProcess.command(tool, arguments, in: folder.directory)
        let result = try runProcess(executable, full, in: folder.directory)
        return (result.status, String(decoding: result.output, as: UTF8.self), result.error)
    }

    func log(_ folder: ServerProcess) -> String {
        (try? String(contentsOfFile: folder.path("nbd.log"), encoding: .utf8)) ?? ""
    }

    /// Over a Unix socket, with no `tls-hostname`: our client and `nbd info` check the chain
    /// only and connect, as nbdinfo does; a client trusting another CA is refused.
    @Test func x509OverAUnixSocketWithoutAHostName() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let credentials = try certificates(folder)
        let socket = try await serve(folder, "nameless", ["--tls=require", "--tls-certificates", credentials.server])
        let uri = "nbds+unix:///?socket=\(socket)&tls-certificates=\(credentials.client)"
        #expect(try runNBD(["info", "--size", uri]).output == "67108864\n")
        #expect(try attempt(folder, "nbdinfo", ["--size", uri]).output == "67108864\n")
        let export = try await NBDExport.connect(to: NBDURI(uri), configuration: .filesFromURIs)
        #expect(export.tlsVersion != nil)
        await export.disconnect()
        let foreign = try runNBD(["info", "--size", "nbds+unix:///?socket=\(socket)&tls-certificates=\(credentials.other)"])
        #expect(foreign.status != 0 && foreign.error.contains("could not be verified"), "\(foreign.error)")
    }

    @Test func realClientsReadAndWriteOverX509() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let credentials = try certificates(folder)
        let socket = try await serve(folder, "x509", ["--tls-certificates", credentials.server])
        let uri = x509URI(socket, credentials.client)

        let info = String(decoding: try folder.run("nbdinfo", ["--json", uri]), as: UTF8.self)
        #expect(info.contains("\"TLS\": true") && info.contains("\"export-size\": 67108864"), "\(info)")
        // nbdsh imports Debian's python3 module: Debian's python3 goes first on PATH.
        let negotiated = String(
            decoding: try folder.run(
                "env",
                [
                    "PATH=/usr/bin:/bin", try ServerProcess.executable("nbdsh"), "-c",
                    "h.set_uri_allow_local_file(True); h.connect_uri('\(uri)'); print(h.get_tls_negotiated())",
                ]
            ),
            as: UTF8.self
        )
        #expect(negotiated.trimmingCharacters(in: .whitespacesAndNewlines) == "True")

        // nbdcopy both ways: the bytes come back as they went.
        let data = Data(pattern(8 << 20, seed: 31).readableBytesView)
        try data.write(to: URL(fileURLWithPath: folder.path("in.raw")))
        _ = try folder.run("nbdcopy", [folder.path("in.raw"), uri])
        _ = try folder.run("nbdcopy", [uri, folder.path("out.raw")])
        let back = try Data(contentsOf: URL(fileURLWithPath: folder.path("out.raw")))
        #expect(back.count == 64 << 20 && back.prefix(8 << 20) == data)

        // qemu-io writes through a tls-creds-x509 object; our own client reads it back over TLS.
        let object = "tls-creds-x509,id=tls0,dir=\(credentials.client),endpoint=client"
        let image = "driver=nbd,path=\(socket),tls-creds=tls0,tls-hostname=localhost"
        _ = try folder.run("qemu-io", ["--object", object, "--image-opts", image, "-c", "write -P 0x5a 1M 64k"])
        let qemuInfo = String(decoding: try folder.run("qemu-img", ["info", "--object", object, "--image-opts", image]), as: UTF8.self)
        #expect(qemuInfo.contains("64 MiB"), "\(qemuInfo)")
        // Trixie's peers too: libnbd 1.22 (which asks for extended headers) and qemu 10.
        let newer = try attempt(folder, "trixie:nbdinfo", ["--json", uri])
        #expect(newer.status == 0 && newer.output.contains("\"TLS\": true"), "\(newer.error)")
        let copied = try attempt(folder, "trixie:nbdcopy", [uri, folder.path("trixie.raw")])
        #expect(copied.status == 0, "\(copied.error)")
        // What qemu-io wrote above is in it too.
        var expected = data
        expected.replaceSubrange((1 << 20)..<((1 << 20) + 65536), with: Data(repeating: 0x5a, count: 65536))
        #expect(try Data(contentsOf: URL(fileURLWithPath: folder.path("trixie.raw"))).prefix(8 << 20) == expected)
        let qemu10 = try attempt(folder, "trixie:qemu-img", ["info", "--object", object, "--image-opts", image])
        #expect(qemu10.status == 0 && qemu10.output.contains("64 MiB"), "\(qemu10.error)")

        let export = try await NBDExport.connect(to: NBDURI(uri), configuration: .filesFromURIs)
        #expect(export.tlsVersion != nil)
        let read = try await export.read(at: 1 << 20, length: 65536)
        #expect(read.readableBytesView.allSatisfy { $0 == 0x5a })
        await export.disconnect()
        #expect(log(folder).contains("TLS established"))
    }

    @Test func clientsInClearLearnNothingAndTLSMustBeRight() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let credentials = try certificates(folder)
        let socket = try await serve(folder, "require", ["--tls=require", "--tls-certificates", credentials.server])

        // In clear: refused, and LIST (names of exports) too. nbdinfo 1.22 prints why.
        #expect(try attempt(folder, "nbdinfo", [NBDURI(socket: socket).description]).status != 0)
        let plain = try attempt(folder, "trixie:nbdinfo", [NBDURI(socket: socket).description])
        #expect(plain.status != 0 && plain.error.contains("this server requires TLS: send NBD_OPT_STARTTLS first"), "\(plain.error)")
        let connection = try await NBDConnection.connect(to: NBDURI(socket: socket))
        await #expect {
            _ = try await connection.list()
        } throws: { ($0 as? NBDError)?.optionReply == .errTLSRequired }
        await connection.abort()
        // A client that trusts another CA does not accept the server (libnbd 1.22; 1.14 does not
        // check the chain against the folder's CA, with nbdkit either).
        let untrusted = try attempt(folder, "trixie:nbdinfo", ["--size", x509URI(socket, credentials.other)])
        #expect(untrusted.status != 0 && untrusted.error.contains("certificate verification"), "\(untrusted.error)")
        await #expect {
            _ = try await NBDExport.connect(to: NBDURI(x509URI(socket, credentials.other)), configuration: .filesFromURIs)
        } throws: { ($0 as? NBDError)?.code == .tlsFailed }

        // --tls=on: clients in clear and over TLS are both served.
        let either = try await serve(folder, "on", ["--tls=on", "--tls-certificates", credentials.server])
        #expect(try attempt(folder, "nbdinfo", ["--size", NBDURI(socket: either).description]).output == "67108864\n")
        #expect(try attempt(folder, "nbdinfo", ["--size", x509URI(either, credentials.client)]).output == "67108864\n")
    }

    @Test func clientCertificatesAreVerifiedAndIdentitiesAllowed() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        let credentials = try certificates(folder)
        let verifying = try await serve(folder, "verify", ["--tls-certificates", credentials.server, "--tls-verify-peer"])
        // No client certificate, or one from another CA: refused. The CA's own: served.
        #expect(try attempt(folder, "nbdinfo", ["--size", x509URI(verifying, credentials.client)]).status != 0)
        #expect(try attempt(folder, "nbdinfo", ["--size", x509URI(verifying, credentials.stranger)]).status != 0)
        // The server's log says why, in words.
        #expect(log(folder).contains("the client sent no certificate, and this server requires one"), "\(log(folder))")
        #expect(log(folder).contains("the client's certificate could not be verified"), "\(log(folder))")
        #expect(try attempt(folder, "nbdinfo", ["--size", x509URI(verifying, credentials.identity)]).output == "67108864\n")

        let allowing = try await serve(
            folder,
            "allow",
            ["--tls-certificates", credentials.server, "--tls-verify-peer", "--tls-allow", "CN=someone else"]
        )
        #expect(try attempt(folder, "nbdinfo", ["--size", x509URI(allowing, credentials.identity)]).status != 0)
        #expect(log(folder).contains("the client \"CN=swift-nbd test client\" is not on the TLS allow-list"), "\(log(folder))")
        let allowed = try await serve(
            folder,
            "allowed",
            ["--tls-certificates", credentials.server, "--tls-verify-peer", "--tls-allow", "CN=swift-nbd test client"]
        )
        #expect(try attempt(folder, "nbdinfo", ["--size", x509URI(allowed, credentials.identity)]).output == "67108864\n")
    }

    @Test func preSharedKeysAndTheirRefusals() async throws {
        let folder = try ServerProcess()
        defer { folder.stop() }
        try FileManager.default.createDirectory(atPath: folder.path("psk"), withIntermediateDirectories: true)
        try "alice:0123456789abcdef0123456789abcdef\nbob:00112233445566778899aabbccddeeff\n"
            .write(toFile: folder.path("psk/keys.psk"), atomically: true, encoding: .utf8)
        try "alice:ffeeddccbbaa99887766554433221100\n".write(toFile: folder.path("wrong.psk"), atomically: true, encoding: .utf8)
        try "carol:0123456789abcdef0123456789abcdef\n".write(toFile: folder.path("carol.psk"), atomically: true, encoding: .utf8)
        let socket = try await serve(folder, "psk", ["--tls-psk", folder.path("psk/keys.psk"), "--tls-allow", "alice"])
        func uri(_ user: String, _ file: String) -> String { "nbds+unix://\(user)@/?socket=\(socket)&tls-psk-file=\(folder.path(file))" }

        #expect(try attempt(folder, "nbdinfo", ["--size", uri("alice", "psk/keys.psk")]).output == "67108864\n")
        #expect(try attempt(folder, "nbdinfo", ["--size", uri("alice", "wrong.psk")]).status != 0, "a wrong key")
        #expect(try attempt(folder, "nbdinfo", ["--size", uri("carol", "carol.psk")]).status != 0, "an unknown user")
        #expect(try attempt(folder, "nbdinfo", ["--size", uri("bob", "psk/keys.psk")]).status != 0, "a user not allowed")
        #expect(log(folder).contains("the client \"bob\" is not on the TLS allow-list"), "\(log(folder))")
        #expect(log(folder).contains("the client's pre-shared key or user name is not this server's"), "\(log(folder))")
        #expect(log(folder).contains("the client's user name is not in this server's pre-shared key file"), "\(log(folder))")
        #expect(!log(folder).contains("BoringSSL") && !log(folder).contains("SSL_"), "\(log(folder))")

        // qemu with a tls-creds-psk object, and our own client.
        let object = "tls-creds-psk,id=tls0,dir=\(folder.path("psk")),username=alice,endpoint=client"
        _ = try folder.run(
            "qemu-io",
            ["--object", object, "--image-opts", "driver=nbd,path=\(socket),tls-creds=tls0", "-c", "write -P 0x33 0 4k"]
        )
        let export = try await NBDExport.connect(to: NBDURI(uri("alice", "psk/keys.psk")), configuration: .filesFromURIs)
        #expect(export.tlsVersion == "tlsv12")
        #expect(try await export.read(at: 0, length: 4096).readableBytesView.allSatisfy { $0 == 0x33 })
        await export.disconnect()
    }

    @Test func badCredentialsStopServeAtStartWithOneLine() throws {
        let cases: [([String], String)] = [
            (["--tls-certificates", "/nonexistent"], "cannot read the server certificate /nonexistent/server-cert.pem"),
            (["--tls=require"], "--tls=require needs --tls-certificates DIR or --tls-psk FILE"),
            (["--tls=maybe", "--tls-psk", "/k"], "--tls takes off, on or require"),
            (["--tls-psk", "/nonexistent.psk"], "cannot read the PSK file /nonexistent.psk"),
            (["--tls-psk", "/k", "--tls-verify-peer"], "--tls-verify-peer needs --tls-certificates"),
            (["--tls=off", "--tls-allow", "alice"], "--tls=off does not go with"),
            (["--tls=on", "--tls-psk", "/k", "--tls-allow", "alice"], "--tls-allow needs --tls=require"),
        ]
        for (options, message) in cases {
            let result = try runNBD(["serve", "--memory", "1M", "--socket", "/tmp/nbd-tls-never.sock"] + options)
            #expect(result.status != 0, "\(options)")
            #expect(result.error.contains(message) && result.error.split(separator: "\n").count == 1, "\(options): \(result.error)")
        }
    }
}
