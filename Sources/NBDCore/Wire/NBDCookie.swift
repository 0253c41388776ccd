/// The 64-bit handle a client gives each request and the server copies into every reply to it
/// ("cookie"), as its own type, as swift-nio-http2 has `HTTP2StreamID`: a cookie is not an
/// offset or a length, and cannot be mixed up with one.
@_spi(NBDMachines) public struct NBDCookie: Hashable, Comparable, Sendable, ExpressibleByIntegerLiteral, CustomStringConvertible {
    /// The value on the wire.
    public var rawValue: UInt64

    /// The cookie with this wire value.
    @inlinable public init(_ rawValue: UInt64) { self.rawValue = rawValue }

    @inlinable public init(integerLiteral value: UInt64) { self.rawValue = value }

    /// The cookie after this one (wrapping around), for a client that numbers its requests.
    @inlinable public var next: NBDCookie { NBDCookie(rawValue &+ 1) }

    @inlinable public static func < (lhs: NBDCookie, rhs: NBDCookie) -> Bool { lhs.rawValue < rhs.rawValue }

    public var description: String { String(rawValue) }
}
