/// An error value a server returns for a command ("Error values").
///
/// Prints as its POSIX name (`EIO`, `ENOSPC`, ...). Unknown values are kept as they came;
/// the spec says the client "SHOULD treat an unexpected error value as if it had been
/// `NBD_EINVAL`", which ``isKnown`` lets a caller do.
public struct NBDErrno: WireCode {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// `NBD_EPERM`
    public static let EPERM = NBDErrno(rawValue: 1)
    /// `NBD_EIO`
    public static let EIO = NBDErrno(rawValue: 5)
    /// `NBD_ENOMEM`
    public static let ENOMEM = NBDErrno(rawValue: 12)
    /// `NBD_EINVAL`
    public static let EINVAL = NBDErrno(rawValue: 22)
    /// `NBD_ENOSPC`
    public static let ENOSPC = NBDErrno(rawValue: 28)
    /// `NBD_EOVERFLOW`
    public static let EOVERFLOW = NBDErrno(rawValue: 75)
    /// `NBD_ENOTSUP`
    public static let ENOTSUP = NBDErrno(rawValue: 95)
    /// `NBD_ESHUTDOWN`
    public static let ESHUTDOWN = NBDErrno(rawValue: 108)

    /// The spec's name of each value this library knows.
    public static let names: [UInt32: String] = [
        1: "EPERM", 5: "EIO", 12: "ENOMEM", 22: "EINVAL", 28: "ENOSPC", 75: "EOVERFLOW",
        95: "ENOTSUP", 108: "ESHUTDOWN",
    ]

    /// The POSIX name, e.g. `"ENOSPC"`; unknown values print as `"E?(n)"`.
    public var posixName: String { Self.names[rawValue] ?? "E?(\(rawValue))" }

    /// The human text the spec gives each value.
    public var explanation: String {
        switch self {
        case .EPERM: "Operation not permitted"
        case .EIO: "Input/output error"
        case .ENOMEM: "Cannot allocate memory"
        case .EINVAL: "Invalid argument"
        case .ENOSPC: "No space left on device"
        case .EOVERFLOW: "Value too large"
        case .ENOTSUP: "Operation not supported"
        case .ESHUTDOWN: "Server is in the process of being shut down"
        default: "Unknown error \(rawValue)"
        }
    }

    /// The POSIX name.
    public var description: String { posixName }
}
