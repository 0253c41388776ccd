import NBDCore
import NIOCore

/// Runs one request against a backend, off the event loop.
enum RequestPerformer {
    static func run(_ request: RequestHeader, data: [ByteBuffer], backend: any NBDServerBackend, sparse: Bool) async -> ServerReply {
        do {
            return try await perform(request, data: data, backend: backend, sparse: sparse)
        } catch let error as NBDServerError {
            return .failed(error.errno, message: error.message)
        } catch {
            return .failed(.EIO, message: "\(error)")
        }
    }

    static func perform(
        _ request: RequestHeader,
        data: [ByteBuffer],
        backend: any NBDServerBackend,
        sparse: Bool
    ) async throws -> ServerReply {
        let fua = request.flags.contains(.fua)
        switch request.type {
        case .read:
            guard request.length > 0 else { return .data([]) }
            if sparse {
                return .data(try await backend.readSparse(at: request.offset, length: Int(request.length)))
            }
            return .data([.data(try await backend.read(at: request.offset, length: Int(request.length)))])
        case .write:
            try await backend.write(segments: data, at: request.offset, fua: fua)
        case .flush:
            try await backend.flush()
        case .trim:
            try await backend.trim(at: request.offset, length: UInt64(request.length))
            if fua { try await backend.flush() }
        case .cache:
            break
        case .writeZeroes:
            // "MUST fail quickly with NBD_ENOTSUP unless the request can be serviced in less time than a corresponding NBD_CMD_WRITE"
            if request.flags.contains(.fastZero), !backend.zeroIsFast {
                throw NBDServerError(.ENOTSUP, "zeroing is not faster than writing here")
            }
            try await backend.zero(at: request.offset, length: UInt64(request.length), noHole: request.flags.contains(.noHole))
            if fua { try await backend.flush() }
        case .blockStatus:
            var extents = try await backend.extents(at: request.offset, length: max(1, UInt64(request.length)))
            if request.flags.contains(.requestOne), let first = extents.first {
                extents = [BlockDescriptor(length: min(first.length, max(1, request.length)), flags: first.flags)]
            }
            return .extents(extents)
        default:
            break
        }
        return .done
    }
}
