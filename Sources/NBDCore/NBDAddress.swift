/// Where an NBD server listens.
public enum NBDAddress: Hashable, Sendable, CustomStringConvertible {
    /// A TCP host name or IP address (IPv4 or IPv6) and port.
    case tcp(host: String, port: Int = NBDAddress.defaultPort)
    /// A Unix domain socket path.
    case unix(path: String)
    /// A Linux abstract Unix socket name (without the leading NUL byte).
    case abstractUnix(name: String)

    /// The port IANA assigned to NBD.
    public static let defaultPort = 10809

    /// The address as `host:port`, `[v6]:port`, `unix:PATH` or `unix:@NAME`.
    public var description: String {
        switch self {
        case .tcp(let host, let port): host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        case .unix(let path): "unix:\(path)"
        case .abstractUnix(let name): "unix:@\(name)"
        }
    }
}
