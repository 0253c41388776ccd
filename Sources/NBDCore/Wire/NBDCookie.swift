/// The 64-bit handle a client gives each request and the server copies into every reply to it
/// ("cookie"), as its own type, as swift-nio-http2 has `HTTP2StreamID`: a cookie is not an
/// offset or a length, and cannot be mixed up with one.
package struct NBDCookie: Hashable, Comparable, Sendable, ExpressibleByIntegerLiteral, CustomStringConvertible {
    /// The value on the wire.
    package var rawValue: UInt64

    /// The cookie with this wire value.
    @inlinable package init(_ rawValue: UInt64) { self.rawValue = rawValue }

    @inlinable package init(integerLiteral value: UInt64) { self.rawValue = value }

    /// The cookie after this one (wrapping around), for a client that numbers its requests.
    @inlinable package var next: NBDCookie { NBDCookie(rawValue &+ 1) }

    @inlinable package static func < (lhs: NBDCookie, rhs: NBDCookie) -> Bool { lhs.rawValue < rhs.rawValue }

    package var description: String { String(rawValue) }
}
