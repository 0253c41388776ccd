@_spi(NBDMachines) import NBDCore
import NIOCore

/// Makes the backend calls the transmission machine decided, off the event loop. What a
/// request's flags mean is the machine's to say (``ServerOperation``); this only calls.
enum RequestPerformer {
    /// Performs `operation`; on a resizable export, through its `gate`, which checks the range
    /// against the size of the moment and keeps resizes apart from everything else.
    static func run(_ operation: ServerOperation, on backend: any NBDServerBackend, within gate: ResizeGate?) async -> ServerReply {
        do {
            guard let gate else { return try await perform(operation, on: backend) }
            if case .resize(let size, _) = operation {
                return try await gate.resize(to: size) { try await perform(operation, on: backend) }
            }
            if case .blockStatus = operation {
                // The last extent may run past the end; only where the range starts must be inside.
                return try await gate.request(operation.range, clampedToSize: true) { range in
                    let range = range!
                    return try await perform(
                        .blockStatus(offset: range.lowerBound, length: range.upperBound - range.lowerBound),
                        on: backend
                    )
                }
            }
            return try await gate.request(operation.range) { _ in try await perform(operation, on: backend) }
        } catch let error as NBDServerError {
            return .failed(error.errno, message: error.message)
        } catch {
            return .failed(.EIO, message: "\(error)")
        }
    }

    static func perform(_ operation: ServerOperation, on backend: any NBDServerBackend) async throws -> ServerReply {
        switch operation {
        case .read(let offset, let length, let sparse):
            guard length > 0 else { return .data([]) }
            if sparse { return .data(try await backend.readSparse(at: offset, length: length)) }
            return .data([.data(try await backend.read(at: offset, length: length))])
        case .write(let data, let offset, let fua):
            try await backend.write(segments: data, at: offset, fua: fua)
        case .flush:
            try await backend.flush()
        case .trim(let offset, let length, let flush):
            try await backend.trim(at: offset, length: length)
            if flush { try await backend.flush() }
        case .zero(let offset, let length, let noHole, let flush):
            try await backend.zero(at: offset, length: length, noHole: noHole)
            if flush { try await backend.flush() }
        case .blockStatus(let offset, let length):
            return .extents(try await backend.extents(at: offset, length: length))
        case .resize(let size, let flush):
            try await backend.resize(to: size)
            if flush { try await backend.flush() }
        }
        return .done
    }
}
