/// Where an NBD server listens.
public enum NBDAddress: Hashable, Sendable, CustomStringConvertible {
    /// A TCP host name or IP address (IPv4 or IPv6) and port.
    case tcp(host: String, port: Int = NBDAddress.defaultPort)
    /// A Unix domain socket path.
    case unix(path: String)
    /// A Linux abstract Unix socket name (without the leading NUL byte).
    case abstractUnix(name: String)
    /// An `AF_VSOCK` address (Linux): the context id of a virtual machine, or 2 for the host
    /// seen from a guest, and a port.
    case vsock(cid: UInt32, port: UInt32 = UInt32(NBDAddress.defaultPort))

    /// The context id of the host, seen from a virtual machine (`VMADDR_CID_HOST`).
    public static let vsockHostCID: UInt32 = 2

    /// The port IANA assigned to NBD.
    public static let defaultPort = 10809

    /// The address as `host:port`, `[v6]:port`, `unix:PATH`, `unix:@NAME` or `vsock:CID:PORT`.
    public var description: String {
        switch self {
        case .tcp(let host, let port): host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        case .unix(let path): "unix:\(path)"
        case .abstractUnix(let name): "unix:@\(name)"
        case .vsock(let cid, let port): "vsock:\(cid):\(port)"
        }
    }
}
