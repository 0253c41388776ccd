/// How requests and replies are framed in transmission, as negotiation decided
/// ("Transmission": simple, structured or extended).
///
/// Ordered from the oldest to the richest: a client asks for the richest it wants and falls
/// back, as qemu does, from `NBD_OPT_EXTENDED_HEADERS` to `NBD_OPT_STRUCTURED_REPLY` to nothing.
public enum TransmissionFormat: Int, Hashable, Comparable, Sendable, CaseIterable, CustomStringConvertible {
    /// Neither option was agreed: 28-byte requests, 16-byte simple replies only.
    case simple
    /// `NBD_OPT_STRUCTURED_REPLY`: 28-byte requests, simple replies and 20-byte structured
    /// chunks with 32-bit lengths.
    case structured
    /// `NBD_OPT_EXTENDED_HEADERS`: 32-byte requests and reply chunks with 64-bit lengths, and
    /// no simple reply ("If extended headers have been negotiated, a simple reply MUST NOT be used").
    case extended

    public static func < (lhs: TransmissionFormat, rhs: TransmissionFormat) -> Bool { lhs.rawValue < rhs.rawValue }

    /// Whether replies come as chunks (structured or extended): sparse reads, block status and
    /// error messages.
    public var hasChunks: Bool { self != .simple }

    /// What nbdinfo calls it: `simple`, `structured` or `extended` (packets).
    public var description: String {
        switch self {
        case .simple: "simple"
        case .structured: "structured"
        case .extended: "extended"
        }
    }
}
