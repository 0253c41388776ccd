import Foundation
import NBDCopy
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Shows a copy's progress: a bar on a terminal, plain lines otherwise, nbdcopy's `N/100` lines
/// on a file descriptor, or a JSON object a second for scripts. It renders the values the copy
/// engine's `CopyProgress` hands out.
final class Progress: Sendable {
    enum Mode {
        case off, terminal, lines, json
        case descriptor(Int32)
    }

    private struct State {
        var lastPercent = -1
        var lastReport = ContinuousClock.now - .seconds(3600)
    }

    private let mode: Mode
    private let progress: CopyProgress
    private let state = NIOLockedValueBox(State())
    /// Says when a connection is being dialled again: shown at once, since no bytes move then.
    private let connections: ConnectionWatch?
    /// Reads the updates until the last one.
    private let renderer = NIOLockedValueBox<Task<Void, Never>?>(nil)

    init(_ option: String?, of progress: CopyProgress, connections: ConnectionWatch? = nil) throws {
        self.progress = progress
        self.connections = connections
        switch option {
        case nil: mode = .off
        case "auto": mode = isatty(2) != 0 ? .terminal : .lines
        case "json": mode = .json
        case let number?: mode = .descriptor(Int32(number)!)
        }
        // Nothing to show, so nothing reads the updates.
        if case .off = mode { return }
        connections?.onChange { [weak self] in self?.redraw() }
        renderer.withLockedValue {
            $0 = Task { [self] in
                for await snapshot in progress.updates { self.show(snapshot) }
            }
        }
    }

    /// Shows the state now, whatever the interval: a connection was lost or came back.
    func redraw() {
        report(progress.snapshot)
    }

    /// Waits until the last snapshot (after `CopyProgress.finish()`) is shown.
    func finished() async {
        await renderer.withLockedValue { $0 }?.value
    }

    /// Shows `snapshot` when it is due: the last one always, others once an interval.
    private func show(_ snapshot: CopyProgress.Snapshot) {
        let interval: Duration
        switch mode {
        case .off: return
        case .terminal: interval = .milliseconds(200)
        case .lines, .json: interval = .seconds(1)
        case .descriptor: interval = .zero
        }
        let now = ContinuousClock.now
        let due =
            snapshot.finished
            || state.withLockedValue { state in
                guard now - state.lastReport >= interval else { return false }
                state.lastReport = now
                return true
            }
        if due { report(snapshot) }
    }

    private func report(_ snapshot: CopyProgress.Snapshot) {
        let (done, total, final, percent, rate) = (snapshot.done, snapshot.total, snapshot.finished, snapshot.percent, snapshot.rate)
        let elapsed = snapshot.seconds
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
                if let eta = snapshot.secondsLeft { text += ", ETA \(Self.time(eta))" }
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
            fields.append("\"eta\": \(snapshot.secondsLeft.map { String(format: "%.0f", $0) } ?? "null")")
            fields.append("\"reconnecting\": \(reconnecting)")
            fields.append("\"finished\": \(final)")
            StandardStreams.error("{ \(fields.joined(separator: ", ")) }\n")
        }
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
