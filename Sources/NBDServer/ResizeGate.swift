@_spi(NBDMachines) import NBDCore
import NIOConcurrencyHelpers

/// Keeps the requests of every connection to a resizable export within its current size, and
/// a resize apart from them: one gate per export, shared by its connections.
///
/// Requests pass the gate together; a resize waits for those inside to finish and holds new
/// ones back until it is done (they are then checked against the new size), as a readers-writer
/// lock does. So no request of any connection touches bytes past the end it sees, and the
/// extension's "requests beyond the new size but not beyond the old one MUST fail with ENOSPC"
/// holds whichever connection resized.
final class ResizeGate: Sendable {
    private struct State {
        var size: UInt64
        /// Requests inside the gate.
        var inside = 0
        /// A resize is running or waiting for the requests inside: new ones wait.
        var resizing = false
        /// A resize waiting for the requests inside to leave.
        var drained: CheckedContinuation<Void, Never>?
        /// Requests, and further resizes, waiting for the resize to end.
        var waiting: [CheckedContinuation<Void, Never>] = []
    }

    private let state: NIOLockedValueBox<State>

    /// A gate for an export of `size` bytes.
    init(size: UInt64) {
        state = NIOLockedValueBox(State(size: size))
    }

    /// The export's size now.
    var size: UInt64 { state.withLockedValue { $0.size } }

    /// Runs `body` inside the gate once `range` (if any) is checked against the current size;
    /// past it, fails with `ENOSPC`. A block status range is cut at the end instead.
    func request<Result>(
        _ range: Range<UInt64>?,
        clampedToSize: Bool = false,
        _ body: (Range<UInt64>?) async throws -> Result
    ) async throws -> Result {
        let size = await enter()
        defer { leave() }
        guard let range else { return try await body(nil) }
        if clampedToSize, range.lowerBound < size { return try await body(range.lowerBound..<min(range.upperBound, size)) }
        guard range.upperBound <= size else {
            throw NBDServerError(.ENOSPC, "range past the end of the export (\(size) bytes)")
        }
        return try await body(range)
    }

    /// Runs `resize` alone, once every request inside has left; on success the size is
    /// `newSize` for every request after it.
    func resize<Result>(to newSize: UInt64, _ resize: () async throws -> Result) async throws -> Result {
        await enterAlone()
        defer { leaveAlone() }
        let result = try await resize()
        state.withLockedValue { $0.size = newSize }
        return result
    }

    private func enter() async -> UInt64 {
        while true {
            let size: UInt64? = state.withLockedValue { state in
                guard !state.resizing else { return nil }
                state.inside += 1
                return state.size
            }
            if let size { return size }
            await resizeEnded()
        }
    }

    /// Returns once no resize runs (at once when none does).
    private func resizeEnded() async {
        await withCheckedContinuation { continuation in
            let waits = state.withLockedValue { state in
                guard state.resizing else { return false }
                state.waiting.append(continuation)
                return true
            }
            if !waits { continuation.resume() }
        }
    }

    private func leave() {
        let drained = state.withLockedValue { state in
            state.inside -= 1
            guard state.inside == 0, let drained = state.drained else { return nil as CheckedContinuation<Void, Never>? }
            state.drained = nil
            return drained
        }
        drained?.resume()
    }

    private func enterAlone() async {
        while true {
            let started = state.withLockedValue { state in
                guard !state.resizing else { return false }
                state.resizing = true
                return true
            }
            if started { break }
            await resizeEnded()
        }
        await withCheckedContinuation { continuation in
            let waits = state.withLockedValue { state in
                guard state.inside > 0 else { return false }
                state.drained = continuation
                return true
            }
            if !waits { continuation.resume() }
        }
    }

    private func leaveAlone() {
        let waiting = state.withLockedValue { state in
            state.resizing = false
            defer { state.waiting = [] }
            return state.waiting
        }
        for waiter in waiting { waiter.resume() }
    }
}
