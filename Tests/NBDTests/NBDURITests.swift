import NBD
import Testing

@Suite("NBD URIs")
struct NBDURITests {
    @Test(arguments: [
        // The spec's export-name table.
        ("nbd://example.com/disk", "disk"),
        ("nbd+unix:///disk?socket=sock", "disk"),
        ("nbd://example.com/", ""),
        ("nbd://example.com", ""),
        ("nbd://example.com//disk", "/disk"),
        ("nbd://example.com/hello%20world", "hello world"),
    ])
    func exportNameFromThePath(uri: String, name: String) throws {
        #expect(try NBDURI(uri).exportName == name)
    }

    @Test func tcpDefaultsAndSchemeCase() throws {
        let uri = try NBDURI("NBD://example.com/x")
        #expect(uri.address == .tcp(host: "example.com", port: 10809))
        #expect(!uri.requiresTLS)
        #expect(try NBDURI("nbd://example.com:1234").address == .tcp(host: "example.com", port: 1234))
        #expect(try NBDURI("nbd:///").address == .tcp(host: "localhost", port: 10809))
    }

    @Test func ipv6Literals() throws {
        #expect(try NBDURI("nbd://[::1]:10810/e").address == .tcp(host: "::1", port: 10810))
        #expect(try NBDURI("nbd://[fe80::1]/").address == .tcp(host: "fe80::1", port: 10809))
        #expect(try NBDURI("nbd://[::1]:10810/e").description == "nbd://[::1]:10810/e")
    }

    @Test func transportSaysWhereTheServerIs() throws {
        #expect(try NBDURI("nbd:///").transport == .tcp(host: nil, port: nil))
        #expect(try NBDURI("nbds://h:99/x").transport == .tcp(host: "h", port: 99))
        #expect(try NBDURI("nbd+unix:///e?socket=/tmp/s.sock").transport == .unix(path: "/tmp/s.sock"))
        #expect(try NBDURI("nbd+unix:///?socket=%00abs").transport == .abstractUnix(name: "abs"))
        #expect(try !NBDURI("nbds://h/").isUnix && NBDURI("nbds+unix:///?socket=s").isUnix)
        let abstract = NBDURI(.abstractUnix(name: "n b"), exportName: "e")
        #expect(abstract.description == "nbd+unix:///e?socket=%00n%20b")
        #expect(try NBDURI(abstract.description) == abstract)
    }

    /// libnbd's `nbd+vsock://CID:PORT/EXPORT`: `nbd+vsock:///` is the host (CID 2) from a guest.
    @Test func vsockURIs() throws {
        #expect(try NBDURI("nbd+vsock:///").address == .vsock(cid: 2, port: 10809))
        #expect(try NBDURI("nbd+vsock://3:10810/disk").address == .vsock(cid: 3, port: 10810))
        let secure = try NBDURI("nbds+vsock://42/e?tls-psk-file=/k")
        #expect(secure.requiresTLS && !secure.isUnix && secure.transport == .vsock(cid: 42, port: nil) && secure.exportName == "e")
        for text in ["nbd+vsock:///", "nbd+vsock://3:10810/disk", "nbds+vsock://42/e?tls-psk-file=/k"] {
            #expect(try NBDURI(text).description == text)
            #expect(try NBDURI(NBDURI(text).description) == NBDURI(text))
        }
        #expect(NBDAddress.vsock(cid: 3, port: 10810).description == "vsock:3:10810")
        for (text, why) in [
            ("nbd+vsock://host/", "is not a number"), ("nbd+vsock://4294967295/", "is not a number"),
            ("nbd+vsock:///?socket=/s", "needs the nbd+unix"), ("nbd+vsock://alice@2/", "names no user"),
            ("nbd+vsock://2:0/", "is not a number from 1 to 65535"),
        ] {
            #expect(throws: NBDError.self) { try NBDURI(text) }
            do { _ = try NBDURI(text) } catch { #expect("\(error)".contains(why), "\(text): \(error)") }
        }
    }

    /// This machine has no vsock loopback: the dial is tested up to the system call, whose
    /// failure comes back as a `connectFailed` naming the address.
    @Test func aVsockDialThatFailsSaysWhere() async throws {
        var configuration = NBDClientConfiguration()
        configuration.connectTimeout = .seconds(5)
        do {
            _ = try await NBDConnection.connect(to: .vsock(cid: 3, port: 10809), configuration: configuration)
            Issue.record("a vsock connection to context 3 succeeded on a machine without virtual machines")
        } catch let error as NBDError {
            #expect(error.code == .connectFailed)
            #expect(error.message.hasPrefix("cannot connect to vsock:3:10809: "), "\(error.message)")
        }
    }

    @Test func unixSocketsIncludingAbstract() throws {
        #expect(try NBDURI("nbd+unix:///e?socket=/tmp/s.sock").address == .unix(path: "/tmp/s.sock"))
        #expect(try NBDURI("nbd+unix:///?socket=%00/abstract").address == .abstractUnix(name: "/abstract"))
    }

    @Test func tlsSchemesAndParameters() throws {
        let uri = try NBDURI(
            "nbds+unix://alice@/e?socket=s&tls-type=psk&tls-hostname=h&tls-verify-peer=0"
                + "&tls-psk-file=/k&tls-certificates=/c&tls-username=bob"
        )
        #expect(uri.requiresTLS && uri.isUnix)
        #expect(uri.user == "alice")
        #expect(uri.tlsType == "psk")
        #expect(uri.tlsHostname == "h")
        #expect(uri.tlsVerifyPeer == false)
        #expect(uri.tlsPSKFile == "/k")
        #expect(uri.tlsCertificates == "/c")
        #expect(uri.tlsUsername == "bob")
        #expect(try NBDURI("nbds://h/").requiresTLS)
    }

    @Test(arguments: [
        ("http://example.com/", "unknown scheme"),
        ("nbd+unix:///disk", "socket"),
        ("nbd://example.com/?socket=/s", "socket"),
        ("nbd://example.com:99999/", "port"),
        ("nbd://example.com:-1/", "port"),
        ("nbd://example.com/?frobnicate=1&tls-type=x509", "frobnicate"),
        ("nbd://example.com/?tls-verify-peer=maybe", "tls-verify-peer"),
        ("nbd://[::1/", "IPv6"),
        ("nbd://h/%zz", "percent"),
        ("nbd+unix://host/?socket=s", "host"),
        // As strict as nbdinfo: no authority, characters a URI cannot hold, an empty socket.
        ("nbd:/disk", "no \"//\" after \"nbd:\""), ("nbd:disk", "//"), ("nbd+unix:/disk?socket=/s", "//"),
        ("nbd://local host/", "\" \" may not appear in a URI"), ("nbd://h/a b", "percent-encode"),
        ("nbd://h/caf\u{E9}", "may not appear"), ("nbd://h/a\"b", "may not appear"),
        ("nbd+unix:///?socket=", "socket parameter"),
        // Found by fuzzing: an IPv6 literal whose escape decoded to a control character.
        ("nbd://[:1z1%08:]/", "IPv6 literal holds hex digits"),
        // Found by fuzzing: it parsed, and printed back as a different URI.
        ("nbd://b::1]:111nb1d11::", "brackets"), ("nbd://::1/", "brackets"),
        // Found by fuzzing: an escaped colon in a host name printed back as an IPv6 literal.
        ("nbd://%0d%3A", "cannot hold \":\""), ("nbd://a%3ab:10809/", "cannot hold \":\""),
    ])
    func badURIsNameTheProblem(uri: String, mentions: String) {
        #expect { try NBDURI(uri) } throws: { error in
            guard let error = error as? NBDError else { return false }
            return error.code == .invalidURI && error.message.contains(mentions)
        }
    }

    @Test(arguments: [
        "nbd://example.com/disk",
        "nbds://user@example.com:1234/a%20b?tls-verify-peer=1",
        "nbd+unix:///e?socket=/tmp/x%26y.sock",
        "nbds+unix:///?socket=%00abs&tls-type=x509&tls-hostname=srv",
        "nbd://[2001:db8::1]:10809/%2Fslash",
        "nbd://h/caf%C3%A9",
    ])
    func printsBackAnEquivalentURI(text: String) throws {
        let uri = try NBDURI(text)
        let again = try NBDURI(uri.description)
        #expect(again == uri)
    }

    @Test func builtURIsParseBack() throws {
        let unix = NBDURI(socket: "/run/n bd.sock", exportName: "a/b")
        #expect(try NBDURI(unix.description) == unix)
        let tcp = NBDURI(host: "::1", port: 5000, exportName: "x")
        #expect(try NBDURI(tcp.description) == tcp)
    }
}
