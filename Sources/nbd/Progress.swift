import Foundation
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Progress of a copy: a bar on a terminal, plain lines otherwise, or nbdcopy's `N/100` lines
/// on a file descriptor.
final class Progress: Sendable {
    enum Mode {
        case off, terminal, lines
        case descriptor(Int32)
    }

    private struct State {
        var done: UInt64 = 0
        var lastPercent = -1
        var lastReport = Date.distantPast
    }

    private let mode: Mode
    private let total: UInt64?
    private let state = NIOLockedValueBox(State())
    private let start = Date()

    init(_ option: String?, total: UInt64?) throws {
        self.total = total
        switch option {
        case nil: mode = .off
        case "auto": mode = isatty(2) != 0 ? .terminal : .lines
        case let number?: mode = .descriptor(Int32(number)!)
        }
    }

    func add(_ bytes: UInt64) {
        let now = Date()
        let interval: TimeInterval
        switch mode {
        case .off: interval = .infinity
        case .terminal: interval = 0.2
        case .lines: interval = 1
        case .descriptor: interval = 0
        }
        let due: UInt64? = state.withLockedValue { state in
            state.done += bytes
            guard now.timeIntervalSince(state.lastReport) >= interval else { return nil }
            state.lastReport = now
            return state.done
        }
        if let due { report(due, final: false) }
    }

    func finish() {
        report(state.withLockedValue { $0.done }, final: true)
    }

    private func report(_ done: UInt64, final: Bool) {
        let percent = total.map { $0 == 0 ? 100 : Int(done * 100 / $0) }
        let elapsed = max(Date().timeIntervalSince(start), 0.001)
        let rate = Double(done) / elapsed
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
                let filled = percent * 30 / 100
                let eta = rate > 0 ? Double(total - min(done, total)) / rate : 0
                text += "[" + String(repeating: "=", count: filled) + String(repeating: " ", count: 30 - filled) + "] "
                text += String(
                    format: "%3d%% %@ of %@, %@/s, ETA %@",
                    percent,
                    Self.bytes(done),
                    Self.bytes(total),
                    Self.bytes(UInt64(rate)),
                    Self.time(eta)
                )
            } else {
                text += String(format: "%@, %@/s", Self.bytes(done), Self.bytes(UInt64(rate)))
            }
            FileHandle.standardError.write(Data((text + (final ? "\n" : "")).utf8))
        case .lines:
            let text = percent.map { "\($0)% " } ?? ""
            FileHandle.standardError.write(Data("copied \(text)\(Self.bytes(done)) at \(Self.bytes(UInt64(rate)))/s\n".utf8))
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

    static func time(_ seconds: Double) -> String {
        let whole = Int(seconds.rounded())
        return String(format: "%d:%02d", whole / 60, whole % 60)
    }
}
