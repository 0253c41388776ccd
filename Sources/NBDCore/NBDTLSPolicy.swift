/// Whether a client uses TLS (`NBD_OPT_STARTTLS`, "TLS support"), with libnbd's three policies.
public enum NBDTLSPolicy: Sendable, Hashable {
    /// Never TLS: no STARTTLS is sent (`nbd://` by default).
    case disable
    /// Try STARTTLS; go on in clear only if the server says it has no TLS.
    case allow
    /// TLS or nothing (`nbds://`): a server that refuses is left at once, with nothing sent in clear.
    case require
}
