import NIOCore

extension TimeAmount {
    /// The amount as people write it in a message: `8 s`, `0.4 s`, `1.25 s`.
    package var secondsText: String {
        let seconds = Double(nanoseconds) / 1e9
        if seconds == seconds.rounded() { return "\(Int64(seconds)) s" }
        // Milliseconds at most, without trailing zeros: 0.4 s, 1.25 s.
        let milliseconds = Int64((seconds * 1000).rounded())
        var fraction = String(milliseconds % 1000)
        fraction = String(repeating: "0", count: 3 - fraction.count) + fraction
        while fraction.hasSuffix("0") { fraction.removeLast() }
        return "\(milliseconds / 1000)" + (fraction.isEmpty ? "" : ".\(fraction)") + " s"
    }
}

extension Duration {
    /// The duration as people write it in a message, as ``NIOCore/TimeAmount/secondsText``.
    package var secondsText: String {
        TimeAmount.nanoseconds(components.seconds * 1_000_000_000 + components.attoseconds / 1_000_000_000).secondsText
    }
}
