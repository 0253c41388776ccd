import FuzzSupport
@_spi(NBDMachines) import NBDCore
import NIOCore

/// A client's requests in transmission: framing, the spec's checks, the in-flight and memory
/// bounds, and the framing of every kind of reply; on a writable export, resizes too.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzServerTransmission(_ start: UnsafePointer<UInt8>, _ count: Int) -> CInt {
    var input = FuzzInput(start, count)
    let format = TransmissionFormat(rawValue: Int(input.byte() % 3))!
    let readOnly = input.bool()
    let export = ServerNegotiationStateMachine.Export(
        name: "",
        size: 1 << 24,
        flags: readOnly ? [.hasFlags, .readOnly] : [.hasFlags, .sendFlush, .sendTrim, .sendWriteZeroes, .sendResize],
        blockSizes: BlockSizeConstraints(minimum: 1, preferred: 4096, maximum: 65536)
    )
    let agreement = ServerNegotiationStateMachine.Agreement(
        export: export,
        flags: format == .extended ? export.flags.union(.blockStatusPayload) : export.flags,
        format: format,
        metaContexts: format.hasChunks ? [NBDMetaContext(id: 1, name: "base:allocation")] : []
    )
    let limits = ServerTransmissionStateMachine.Limits(maximumPayload: 65536, maximumRequestsInFlight: 8, maximumBufferedBytes: 256 << 10)
    var machine = ServerTransmissionStateMachine(agreement: agreement, limits: limits)
    var performing: [RequestHeader] = []
    while let piece = input.piece() {
        machine.bytesReceived(piece)
        while let action = machine.next() {
            switch action {
            case .perform(let request, _): performing.append(request)
            case .write(let buffers): machine.bytesWritten(buffers.reduce(0) { $0 + $1.readableBytes })
            case .close, .fatal: return 0
            case .pauseReading, .resumeReading, .armTimer, .cancelTimer: break
            }
            // Answer the oldest now and then, as a backend would, each kind of reply.
            if performing.count > Int(input.byte() % 4) {
                let request = performing.removeFirst()
                machine.requestCompleted(request, reply(to: request, choice: input.byte()))
            }
        }
    }
    for request in performing { machine.requestCompleted(request, reply(to: request, choice: 0)) }
    while machine.next() != nil {}
    machine.timerFired()
    return 0
}

private func reply(to request: RequestHeader, choice: UInt8) -> ServerReply {
    if choice % 7 == 6 { return .failed(.EIO, message: "backend error") }
    switch request.type {
    case .read:
        let half = Int(request.length) / 2
        return .data([.data(ByteBuffer(repeating: choice, count: half)), .hole(Int(request.length) - half)])
    case .blockStatus:
        return .extents([BlockDescriptor(length: max(1, request.length), flags: UInt64(choice % 4))])
    default:
        return .done
    }
}

@_cdecl("FuzzServerTransmission_main")
public func main(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    runFuzzer(argc, argv) { data, count in fuzzServerTransmission(data ?? UnsafePointer(bitPattern: 1)!, count) }
}
