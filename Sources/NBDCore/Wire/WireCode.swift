/// A protocol number that is open-ended on the wire: values this library does not know
/// still round-trip, and known ones print by their spec name.
public protocol WireCode: RawRepresentable, Hashable, Sendable, CustomStringConvertible
where RawValue: FixedWidthInteger & Sendable {
    init(rawValue: RawValue)
    /// The spec's names of the values this library knows.
    static var names: [RawValue: String] { get }
}

extension WireCode {
    /// The spec's name, or the number for an unknown value.
    public var description: String { Self.names[rawValue] ?? "\(Self.self)(\(rawValue))" }
    /// True when the spec (as implemented here) defines this value.
    public var isKnown: Bool { Self.names[rawValue] != nil }
}
