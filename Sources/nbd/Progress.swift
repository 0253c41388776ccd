import Foundation
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Progress of a copy: a bar on a terminal, plain lines otherwise, nbdcopy's `N/100` lines on a
/// file descriptor, or a JSON object a second for scripts.
final class Progress: Sendable {
    enum Mode {
        case off, terminal, lines, json
        case descriptor(Int32)
    }

    private struct State {
        var done: UInt64 = 0
        /// Of `done`, what needed no copying (clean in a bitmap, or copied by an earlier run of
        /// a resumed copy): not part of the rate, or a resumed copy's ETA would be too short.
        var skipped: UInt64 = 0
        var lastPercent = -1
        var lastReport = Date.distantPast
    }

    private let mode: Mode
    private let total: UInt64?
    private let state = NIOLockedValueBox(State())
    private let start = Date()
    /// Says when a connection is being dialled again: shown at once, since no bytes move then.
    private let connections: ConnectionWatch?

    init(_ option: String?, total: UInt64?, connections: ConnectionWatch? = nil) throws {
        self.total = total
        self.connections = connections
        switch option {
        case nil: mode = .off
        case "auto": mode = isatty(2) != 0 ? .terminal : .lines
        case "json": mode = .json
        case let number?: mode = .descriptor(Int32(number)!)
        }
        connections?.onChange { [weak self] in self?.redraw() }
    }

    /// Shows the state now, whatever the interval: a connection was lost or came back.
    func redraw() {
        let (done, skipped) = state.withLockedValue { ($0.done, $0.skipped) }
        report(done, skipped: skipped, final: false)
    }

    func add(_ bytes: UInt64, skipped: Bool = false) {
        let now = Date()
        let interval: TimeInterval
        switch mode {
        case .off: interval = .infinity
        case .terminal: interval = 0.2
        case .lines, .json: interval = 1
        case .descriptor: interval = 0
        }
        let due: (UInt64, UInt64)? = state.withLockedValue { state in
            state.done += bytes
            if skipped { state.skipped += bytes }
            guard now.timeIntervalSince(state.lastReport) >= interval else { return nil }
            state.lastReport = now
            return (state.done, state.skipped)
        }
        if let due { report(due.0, skipped: due.1, final: false) }
    }

    func finish() {
        let (done, skipped) = state.withLockedValue { ($0.done, $0.skipped) }
        report(done, skipped: skipped, final: true)
    }

    private func report(_ done: UInt64, skipped: UInt64, final: Bool) {
        let percent = total.map { $0 == 0 ? 100 : Int(done * 100 / $0) }
        let elapsed = max(Date().timeIntervalSince(start), 0.001)
        let rate = Double(done - skipped) / elapsed
        let reconnecting = !final && connections?.reconnecting == true
        switch mode {
        case .off:
            return
        case .descriptor(let fd):
            guard let percent,
                state.withLockedValue({ state in
                    defer { state.lastPercent = percent }
                    return state.lastPercent != percent
                })
            else { return }
            let line = "\(percent)/100\n"
            _ = line.withCString { write(fd, $0, strlen($0)) }
        case .terminal:
            var text = "\r"
            if let percent, let total {
                let filled = min(percent, 100) * 30 / 100
                text += "[" + String(repeating: "=", count: filled) + String(repeating: " ", count: 30 - filled) + "] "
                text += "\(String(format: "%3d", percent))% \(Self.bytes(done)) of \(Self.bytes(total)), "
            } else {
                text += "\(Self.bytes(done)), "
            }
            if final {
                text += "in \(Self.time(elapsed)), \(Self.bytes(UInt64(rate)))/s"
            } else if reconnecting {
                text += "reconnecting"
            } else {
                text += "\(Self.bytes(UInt64(rate)))/s"
                if let eta = eta(done, rate) { text += ", ETA \(Self.time(eta))" }
            }
            // ESC [ K clears what a longer line before this one left on the right.
            StandardStreams.error((text + "\u{1B}[K" + (final ? "\n" : "")))
        case .lines:
            let text = percent.map { "\($0)% " } ?? ""
            let when = final ? " in \(Self.time(elapsed))" : ""
            let waiting = reconnecting ? ", reconnecting" : ""
            StandardStreams.error("copied \(text)\(Self.bytes(done))\(when) at \(Self.bytes(UInt64(rate)))/s\(waiting)\n")
        case .json:
            var fields = ["\"done\": \(done)", "\"total\": \(total.map(String.init) ?? "null")"]
            fields.append("\"elapsed\": \(String(format: "%.3f", elapsed))")
            fields.append("\"rate\": \(UInt64(rate))")
            fields.append("\"eta\": \(eta(done, rate).map { String(format: "%.0f", $0) } ?? "null")")
            fields.append("\"reconnecting\": \(reconnecting)")
            fields.append("\"finished\": \(final)")
            StandardStreams.error("{ \(fields.joined(separator: ", ")) }\n")
        }
    }

    /// Seconds left at `rate`, when the total is known.
    private func eta(_ done: UInt64, _ rate: Double) -> Double? {
        guard let total else { return nil }
        return rate > 0 ? Double(total - min(done, total)) / rate : nil
    }

    static func bytes(_ count: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var value = Double(count)
        var unit = 0
        while value >= 1024, unit < units.count - 1 {
            value /= 1024
            unit += 1
        }
        return unit == 0 ? "\(count) B" : String(format: "%.1f %@", value, units[unit])
    }

    /// `m:ss`, or `h:mm:ss` from an hour on.
    static func time(_ seconds: Double) -> String {
        let whole = Int(min(seconds, 1e9).rounded())
        let (hours, minutes) = (whole / 3600, whole / 60 % 60)
        return hours > 0 ? String(format: "%d:%02d:%02d", hours, minutes, whole % 60) : String(format: "%d:%02d", minutes, whole % 60)
    }
}
