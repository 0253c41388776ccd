import NBDCore
import NIOCore

/// Makes the backend calls the transmission machine decided, off the event loop. What a
/// request's flags mean is the machine's to say (``ServerOperation``); this only calls.
enum RequestPerformer {
    static func run(_ operation: ServerOperation, on backend: any NBDServerBackend) async -> ServerReply {
        do {
            return try await perform(operation, on: backend)
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
        }
        return .done
    }
}
