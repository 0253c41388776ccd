/// Whether a server offers TLS (`NBD_OPT_STARTTLS`): the spec's three server modes, with
/// nbdkit's names (`--tls=off|on|require`).
public enum NBDServerTLSMode: Sendable, Hashable, CustomStringConvertible {
    /// No TLS (NOTLS): STARTTLS is answered `NBD_REP_ERR_UNSUP`.
    case off
    /// TLS for the clients that ask for it, clear for the others (SELECTIVETLS, with no export
    /// TLS-only).
    case on
    /// TLS or nothing (FORCEDTLS): every option but STARTTLS and ABORT is refused with
    /// `NBD_REP_ERR_TLS_REQD`, so no export's name or size is told in clear.
    case require

    public var description: String {
        switch self {
        case .off: "off"
        case .on: "on"
        case .require: "require"
        }
    }
}
