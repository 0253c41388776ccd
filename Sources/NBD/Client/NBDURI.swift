import NBDCore

/// An NBD URI ("The NBD Uniform Resource Indicator (URI) format"): `nbd://host:port/export`,
/// `nbds://...`, `nbd+unix:///export?socket=PATH`, `nbds+unix://...`.
///
/// Parsing is strict: an unknown scheme or query parameter, a Unix URI without `socket`, or a
/// bad port is an ``NBDError`` with code `invalidURI` naming what is wrong. ``description``
/// prints an equivalent URI back.
public struct NBDURI: Hashable, Sendable, CustomStringConvertible {
    /// Whether the scheme demands TLS (`nbds`, `nbds+unix`): "If encryption cannot be
    /// negotiated then the connection MUST fail."
    public var requiresTLS: Bool
    /// True for `nbd+unix` / `nbds+unix`.
    public var isUnix: Bool
    /// The host for TCP (an IPv6 literal without brackets); nil means `localhost`.
    public var host: String?
    /// The port; nil means 10809.
    public var port: Int?
    /// The URI's userinfo, a TLS-PSK user name.
    public var user: String?
    /// The export name: the path without its leading `/`, percent-decoded.
    public var exportName: String
    /// The `socket` parameter: a Unix socket path, or an abstract name starting with NUL.
    public var socket: String?
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

    /// The query parameters this library understands.
    public static let knownParameters: Set<String> = [
        "socket", "tls-type", "tls-hostname", "tls-verify-peer", "tls-certificates", "tls-psk-file", "tls-username",
    ]

    /// A URI for a TCP export.
    public init(host: String, port: Int? = nil, exportName: String = "", requiresTLS: Bool = false) {
        self.init(requiresTLS: requiresTLS, isUnix: false, exportName: exportName)
        self.host = host
        self.port = port
    }

    /// A URI for an export on a Unix socket.
    public init(socket: String, exportName: String = "", requiresTLS: Bool = false) {
        self.init(requiresTLS: requiresTLS, isUnix: true, exportName: exportName)
        self.socket = socket
    }

    private init(requiresTLS: Bool, isUnix: Bool, exportName: String) {
        self.requiresTLS = requiresTLS
        self.isUnix = isUnix
        self.exportName = exportName
    }

    /// Parses `string`.
    public init(_ string: String) throws(NBDError) {
        func bad(_ why: String) -> NBDError { NBDError(.invalidURI, "invalid NBD URI \"\(string)\": \(why)", connectionUsable: false) }
        guard let colon = string.firstIndex(of: ":") else { throw bad("no scheme") }
        let scheme = string[..<colon].lowercased()
        switch scheme {
        case "nbd": self.init(requiresTLS: false, isUnix: false, exportName: "")
        case "nbds": self.init(requiresTLS: true, isUnix: false, exportName: "")
        case "nbd+unix": self.init(requiresTLS: false, isUnix: true, exportName: "")
        case "nbds+unix": self.init(requiresTLS: true, isUnix: true, exportName: "")
        default: throw bad("unknown scheme \"\(scheme)\" (expected nbd, nbds, nbd+unix or nbds+unix)")
        }
        var rest = string[string.index(after: colon)...]
        if let hash = rest.firstIndex(of: "#") { rest = rest[..<hash] }
        var query: Substring = ""
        if let mark = rest.firstIndex(of: "?") {
            query = rest[rest.index(after: mark)...]
            rest = rest[..<mark]
        }
        var path = rest
        if rest.hasPrefix("//") {
            let afterSlashes = rest.dropFirst(2)
            let end = afterSlashes.firstIndex(of: "/") ?? afterSlashes.endIndex
            try parseAuthority(afterSlashes[..<end], bad)
            path = afterSlashes[end...]
        }
        guard let decodedPath = Self.percentDecode(path) else { throw bad("bad percent-encoding in the path") }
        exportName = decodedPath.hasPrefix("/") ? String(decodedPath.dropFirst()) : decodedPath
        try parseQuery(query, bad)
        if isUnix {
            guard socket != nil else { throw bad("\(scheme) needs a socket parameter, e.g. ?socket=/tmp/nbd.sock") }
            guard host == nil, port == nil else { throw bad("a Unix socket URI must not name a host or port") }
        } else if socket != nil {
            throw bad("the socket parameter needs the nbd+unix or nbds+unix scheme")
        }
    }

    private mutating func parseAuthority(_ authority: Substring, _ bad: (String) -> NBDError) throws(NBDError) {
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
            let after = hostPort[hostPort.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":") else { throw bad("unexpected text after the IPv6 literal") }
                portText = after.dropFirst()
            }
        } else if let colon = hostPort.lastIndex(of: ":") {
            host = String(hostPort[..<colon])
            portText = hostPort[hostPort.index(after: colon)...]
        } else if !hostPort.isEmpty {
            host = String(hostPort)
        }
        if host?.isEmpty == true { host = nil }
        if let host, let decoded = Self.percentDecode(Substring(host)) { self.host = decoded }
        if let portText, !portText.isEmpty {
            guard portText.allSatisfy(\.isASCII), let number = Int(portText), (1...65535).contains(number) else {
                throw bad("port \"\(portText)\" is not a number from 1 to 65535")
            }
            port = number
        }
    }

    private mutating func parseQuery(_ query: Substring, _ bad: (String) -> NBDError) throws(NBDError) {
        var seen: Set<String> = []
        var unknown: [String] = []
        for pair in query.split(separator: "&", omittingEmptySubsequences: true) {
            let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard let key = Self.percentDecode(parts[0]), let value = Self.percentDecode(parts.count > 1 ? parts[1] : "") else {
                throw bad("bad percent-encoding in the query")
            }
            guard Self.knownParameters.contains(key) else { unknown.append(key); continue }
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
        guard unknown.isEmpty else { throw bad("unknown query parameter\(unknown.count > 1 ? "s" : "") \(unknown.joined(separator: ", "))") }
    }

    /// Where to connect.
    public var address: NBDAddress {
        if isUnix, let socket {
            return socket.hasPrefix("\0") ? .abstractUnix(name: String(socket.dropFirst())) : .unix(path: socket)
        }
        return .tcp(host: host ?? "localhost", port: port ?? NBDAddress.defaultPort)
    }

    /// The URI as text, percent-encoded: parsing it gives back an equal ``NBDURI``.
    public var description: String {
        var text = (requiresTLS ? "nbds" : "nbd") + (isUnix ? "+unix" : "") + "://"
        if let user { text += Self.percentEncode(user, keeping: Self.subDelimiters) + "@" }
        if let host { text += host.contains(":") ? "[\(host)]" : Self.percentEncode(host, keeping: Self.subDelimiters) }
        if let port { text += ":\(port)" }
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

    static func percentEncode(_ text: String, keeping allowed: String) -> String {
        var out = ""
        for byte in text.utf8 {
            let scalar = Unicode.Scalar(byte)
            let unreserved = (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A) || "-._~".unicodeScalars.contains(scalar)
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
            guard byte == UInt8(ascii: "%") else { bytes.append(byte); continue }
            guard let high = iterator.next(), let low = iterator.next(),
                  let value = UInt8(String(decoding: [high, low], as: UTF8.self), radix: 16) else { return nil }
            bytes.append(value)
        }
        let text = String(decoding: bytes, as: UTF8.self)
        return text.utf8.elementsEqual(bytes) ? text : nil
    }
}
