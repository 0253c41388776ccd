@_spi(NBDMachines) import NBDCore

/// An NBD URI ("The NBD Uniform Resource Indicator (URI) format"): `nbd://host:port/export`,
/// `nbds://...`, `nbd+unix:///export?socket=PATH`, `nbds+unix://...`, and libnbd's
/// `nbd+vsock://CID:PORT/export` (`nbds+vsock`) for `AF_VSOCK`.
///
/// Parsing is strict: an unknown scheme or query parameter, a Unix URI without `socket`, or a
/// bad port is an `NBDError` with code `invalidURI` naming what is wrong. ``description``
/// prints an equivalent URI back.
public struct NBDURI: Hashable, Sendable, CustomStringConvertible {
    /// How the URI reaches its server: only a Unix URI has a socket, only a TCP one a host.
    public enum Transport: Hashable, Sendable {
        /// `nbd://host:port`: a nil host means `localhost`, a nil port 10809.
        case tcp(host: String?, port: Int?)
        /// `nbd+unix:///?socket=PATH`.
        case unix(path: String)
        /// `nbd+unix:///?socket=%00NAME`: a Linux abstract socket, named without its NUL byte.
        case abstractUnix(name: String)
        /// `nbd+vsock://CID:PORT`: a nil context id means the host (2, for a client in a
        /// virtual machine, as libnbd reads `nbd+vsock:///`), a nil port 10809.
        case vsock(cid: UInt32?, port: Int?)
    }

    /// Whether the scheme demands TLS (`nbds`, `nbds+unix`): "If encryption cannot be
    /// negotiated then the connection MUST fail."
    public var requiresTLS: Bool
    /// Where the server is.
    public var transport: Transport
    /// The URI's userinfo, a TLS-PSK user name.
    public var user: String?
    /// The export name: the path without its leading `/`, percent-decoded.
    public var exportName: String
    /// `tls-type`: `anon`, `x509` or `psk`.
    public var tlsType: String?
    /// `tls-hostname`: the name to verify the server certificate against.
    public var tlsHostname: String?
    /// `tls-verify-peer`: whether to verify the server's identity (default true).
    public var tlsVerifyPeer: Bool?
    /// `tls-certificates`: a directory holding `ca-cert.pem`, `client-cert.pem`, `client-key.pem`.
    public var tlsCertificates: String?
    /// `tls-psk-file`: a PSK file in psktool format.
    public var tlsPSKFile: String?
    /// `tls-username`: the PSK user name (overrides the userinfo).
    public var tlsUsername: String?

    /// The schemes of the NBD URI specification this type reads: each with TLS (`nbds`) and
    /// without, over TCP, a Unix socket and `AF_VSOCK`.
    public static let schemes = ["nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+vsock", "nbds+vsock"]

    /// The query parameters this library understands.
    public static let knownParameters: Set<String> = [
        "socket", "tls-type", "tls-hostname", "tls-verify-peer", "tls-certificates", "tls-psk-file", "tls-username",
    ]

    /// A URI for `transport`.
    public init(_ transport: Transport, exportName: String = "", requiresTLS: Bool = false) {
        self.requiresTLS = requiresTLS
        self.transport = transport
        self.exportName = exportName
    }

    /// A URI for a TCP export.
    public init(host: String, port: Int? = nil, exportName: String = "", requiresTLS: Bool = false) {
        self.init(.tcp(host: host, port: port), exportName: exportName, requiresTLS: requiresTLS)
    }

    /// A URI for an export on a Unix socket.
    public init(socket: String, exportName: String = "", requiresTLS: Bool = false) {
        self.init(.unix(path: socket), exportName: exportName, requiresTLS: requiresTLS)
    }

    /// True for `nbd+unix` and `nbds+unix`.
    public var isUnix: Bool {
        switch transport {
        case .tcp, .vsock: false
        case .unix, .abstractUnix: true
        }
    }

    /// Parses `string`.
    public init(_ string: String) throws(NBDError) {
        func bad(_ why: String) -> NBDError { NBDError(.invalidURI, "invalid NBD URI \"\(string)\": \(why)", connectionUsable: false) }
        // "All NBD URIs MUST also be valid URIs as described in RFC 3986": its characters only.
        if let character = string.unicodeScalars.first(where: { !Self.uriCharacters.contains($0) }) {
            throw bad("\(String(character).debugDescription) may not appear in a URI (RFC 3986); percent-encode it (a space is %20)")
        }
        guard let colon = string.firstIndex(of: ":") else { throw bad("no scheme") }
        let scheme = string[..<colon].lowercased()
        let isUnix: Bool
        let isVsock: Bool
        switch scheme {
        case "nbd", "nbds": (isUnix, isVsock) = (false, false)
        case "nbd+unix", "nbds+unix": (isUnix, isVsock) = (true, false)
        case "nbd+vsock", "nbds+vsock": (isUnix, isVsock) = (false, true)
        default: throw bad("unknown scheme \"\(scheme)\" (expected \(Self.schemes.joined(separator: ", ")))")
        }
        self.init(.tcp(host: nil, port: nil), requiresTLS: scheme.hasPrefix("nbds"))
        var rest = string[string.index(after: colon)...]
        if let hash = rest.firstIndex(of: "#") { rest = rest[..<hash] }
        var query: Substring = ""
        if let mark = rest.firstIndex(of: "?") {
            query = rest[rest.index(after: mark)...]
            rest = rest[..<mark]
        }
        // As libnbd does: the authority's "//" always, even when it is empty (nbd:///export).
        // "nbd:/disk" would otherwise dial localhost without saying so.
        guard rest.hasPrefix("//") else {
            throw bad("no \"//\" after \"\(scheme):\" (write \(scheme)://HOST/EXPORT, or \(scheme):///EXPORT for localhost)")
        }
        let afterSlashes = rest.dropFirst(2)
        let end = afterSlashes.firstIndex(of: "/") ?? afterSlashes.endIndex
        let (host, port) = try parseAuthority(afterSlashes[..<end], bad)
        let path = afterSlashes[end...]
        guard let decodedPath = Self.percentDecode(path) else { throw bad("bad percent-encoding in the path") }
        exportName = decodedPath.hasPrefix("/") ? String(decodedPath.dropFirst()) : decodedPath
        let socket = try parseQuery(query, bad)
        if isUnix {
            // "The query parameters MUST include a parameter called socket".
            guard let socket, !socket.isEmpty else { throw bad("\(scheme) needs a socket parameter, e.g. ?socket=/tmp/nbd.sock") }
            guard host == nil, port == nil else { throw bad("a Unix socket URI must not name a host or port") }
            transport = socket.hasPrefix("\0") ? .abstractUnix(name: String(socket.dropFirst())) : .unix(path: socket)
        } else if isVsock {
            guard socket == nil else { throw bad("the socket parameter needs the nbd+unix or nbds+unix scheme") }
            guard user == nil else { throw bad("a vsock URI names no user") }
            var cid: UInt32?
            if let host {
                guard host.allSatisfy(\.isASCII), let number = UInt32(host), number != UInt32.max else {
                    throw bad("the vsock context id \"\(host)\" is not a number (2 is the host)")
                }
                cid = number
            }
            transport = .vsock(cid: cid, port: port)
        } else {
            guard socket == nil else { throw bad("the socket parameter needs the nbd+unix or nbds+unix scheme") }
            transport = .tcp(host: host, port: port)
        }
    }

    private mutating func parseAuthority(
        _ authority: Substring,
        _ bad: (String) -> NBDError
    ) throws(NBDError) -> (host: String?, port: Int?) {
        var host: String?
        var port: Int?
        var hostPort = authority
        if let at = authority.lastIndex(of: "@") {
            guard let decoded = Self.percentDecode(authority[..<at]) else { throw bad("bad percent-encoding in the user") }
            user = decoded
            hostPort = authority[authority.index(after: at)...]
        }
        var portText: Substring?
        if hostPort.hasPrefix("[") {
            guard let close = hostPort.firstIndex(of: "]") else { throw bad("unterminated IPv6 literal") }
            host = String(hostPort[hostPort.index(after: hostPort.startIndex)..<close])
            // RFC 3986's IP-literal: hex digits, colons and dots (no zone identifiers here), so
            // that it prints back as it came. Found by fuzzing: "[:1z1%08:]" decoded to a control
            // character that the printed URI could not hold.
            guard host!.allSatisfy({ $0.isHexDigit || $0 == ":" || $0 == "." }) else {
                throw bad("an IPv6 literal holds hex digits, colons and dots only, not \"\(host!)\"")
            }
            let after = hostPort[hostPort.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":") else { throw bad("unexpected text after the IPv6 literal") }
                portText = after.dropFirst()
            }
        } else if let colon = hostPort.lastIndex(of: ":") {
            host = String(hostPort[..<colon])
            portText = hostPort[hostPort.index(after: colon)...]
            // Found by fuzzing: "nbd://b::1]:111/" must not be read as the host "b::1]".
            guard host?.contains(":") == false else { throw bad("an IPv6 address needs brackets, e.g. nbd://[::1]:10809/") }
        } else if !hostPort.isEmpty {
            host = String(hostPort)
        }
        if host?.isEmpty == true { host = nil }
        if let text = host, let decoded = Self.percentDecode(Substring(text)) { host = decoded }
        // Found by fuzzing: "nbd://%0d%3A" decodes to a host with a colon, which only an IPv6
        // literal in brackets may hold (and which would print back as one).
        if !hostPort.hasPrefix("["), let host, host.contains(":") {
            throw bad("a host name cannot hold \":\" (an IPv6 address goes in brackets, e.g. nbd://[::1]/)")
        }
        if let portText, !portText.isEmpty {
            guard portText.allSatisfy(\.isASCII), let number = Int(portText), (1...65535).contains(number) else {
                throw bad("port \"\(portText)\" is not a number from 1 to 65535")
            }
            port = number
        }
        return (host, port)
    }

    /// Reads the TLS parameters into `self` and returns the `socket` parameter.
    private mutating func parseQuery(_ query: Substring, _ bad: (String) -> NBDError) throws(NBDError) -> String? {
        var socket: String?
        var seen: Set<String> = []
        var unknown: [String] = []
        for pair in query.split(separator: "&", omittingEmptySubsequences: true) {
            let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard let key = Self.percentDecode(parts[0]), let value = Self.percentDecode(parts.count > 1 ? parts[1] : "") else {
                throw bad("bad percent-encoding in the query")
            }
            guard Self.knownParameters.contains(key) else {
                unknown.append(key)
                continue
            }
            guard seen.insert(key).inserted else { throw bad("parameter \(key) given twice") }
            switch key {
            case "socket": socket = value
            case "tls-type":
                guard ["anon", "x509", "psk"].contains(value) else { throw bad("tls-type must be anon, x509 or psk, not \"\(value)\"") }
                tlsType = value
            case "tls-hostname": tlsHostname = value
            case "tls-verify-peer":
                switch value.lowercased() {
                case "1", "true", "yes", "on": tlsVerifyPeer = true
                case "0", "false", "no", "off": tlsVerifyPeer = false
                default: throw bad("tls-verify-peer must be 0 or 1, not \"\(value)\"")
                }
            case "tls-certificates": tlsCertificates = value
            case "tls-psk-file": tlsPSKFile = value
            default: tlsUsername = value
            }
        }
        guard unknown.isEmpty else {
            throw bad("unknown query parameter\(unknown.count > 1 ? "s" : "") \(unknown.joined(separator: ", "))")
        }
        return socket
    }

    /// Where to connect.
    public var address: NBDAddress {
        switch transport {
        case .tcp(let host, let port): .tcp(host: host ?? "localhost", port: port ?? NBDAddress.defaultPort)
        case .unix(let path): .unix(path: path)
        case .abstractUnix(let name): .abstractUnix(name: name)
        case .vsock(let cid, let port): .vsock(cid: cid ?? NBDAddress.vsockHostCID, port: UInt32(port ?? NBDAddress.defaultPort))
        }
    }

    /// The URI as text, percent-encoded: parsing it gives back an equal ``NBDURI``.
    public var description: String {
        var text = (requiresTLS ? "nbds" : "nbd") + (isUnix ? "+unix" : "")
        if case .vsock = transport { text += "+vsock" }
        text += "://"
        if let user { text += Self.percentEncode(user, keeping: Self.subDelimiters) + "@" }
        var socket: String?
        switch transport {
        case .tcp(let host, let port):
            if let host { text += host.contains(":") ? "[\(host)]" : Self.percentEncode(host, keeping: Self.subDelimiters) }
            if let port { text += ":\(port)" }
        case .unix(let path): socket = path
        case .abstractUnix(let name): socket = "\0" + name
        case .vsock(let cid, let port):
            if let cid { text += "\(cid)" }
            if let port { text += ":\(port)" }
        }
        text += "/" + Self.percentEncode(exportName, keeping: Self.subDelimiters + ":@/")
        let parameters: [(String, String?)] = [
            ("socket", socket), ("tls-type", tlsType), ("tls-hostname", tlsHostname),
            ("tls-verify-peer", tlsVerifyPeer.map { $0 ? "1" : "0" }), ("tls-certificates", tlsCertificates),
            ("tls-psk-file", tlsPSKFile), ("tls-username", tlsUsername),
        ]
        let query = parameters.compactMap { key, value in value.map { "\(key)=\(Self.percentEncode($0, keeping: ":@/"))" } }
        if !query.isEmpty { text += "?" + query.joined(separator: "&") }
        return text
    }

    private static let subDelimiters = "!$'()*+,;="

    /// What RFC 3986 lets a URI hold: unreserved characters, the delimiters, and `%` escapes.
    private static let uriCharacters: Set<Unicode.Scalar> = Set(
        ("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~" + ":/?#[]@" + "!$&'()*+,;=" + "%").unicodeScalars
    )

    static func percentEncode(_ text: String, keeping allowed: String) -> String {
        var out = ""
        for byte in text.utf8 {
            let scalar = Unicode.Scalar(byte)
            let unreserved =
                (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A)
                || "-._~".unicodeScalars.contains(scalar)
            if unreserved || (byte < 0x80 && allowed.unicodeScalars.contains(scalar)) {
                out.unicodeScalars.append(scalar)
            } else {
                out += "%" + (byte < 16 ? "0" : "") + String(byte, radix: 16, uppercase: true)
            }
        }
        return out
    }

    static func percentDecode(_ text: Substring) -> String? {
        var bytes: [UInt8] = []
        var iterator = text.utf8.makeIterator()
        while let byte = iterator.next() {
            guard byte == UInt8(ascii: "%") else {
                bytes.append(byte)
                continue
            }
            guard let high = iterator.next(), let low = iterator.next(),
                let value = UInt8(String(decoding: [high, low], as: UTF8.self), radix: 16)
            else { return nil }
            bytes.append(value)
        }
        let text = String(decoding: bytes, as: UTF8.self)
        return text.utf8.elementsEqual(bytes) ? text : nil
    }
}
