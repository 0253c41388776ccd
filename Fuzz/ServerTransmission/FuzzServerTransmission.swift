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
    // Under a memory budget of 512 KiB for two connections (a floor of 128 KiB each, 256 KiB
    // shared), of which the other connection holds what the input says, asking for exact
    // amounts or 4 KiB at a time.
    let limits = ServerTransmissionStateMachine.Limits(
        maximumPayload: 65536,
        maximumRequestsInFlight: 8,
        maximumBufferedBytes: 256 << 10,
        memoryBudgetCredit: input.bool() ? 4096 : 0
    )
    var machine = ServerTransmissionStateMachine(agreement: agreement, limits: limits)
    var ledger = MemoryBudgetLedger(capacity: 512 << 10, holders: 2)
    _ = ledger.reserve(1, Int(input.byte()) << 10)
    var performing: [RequestHeader] = []
    var ended = false
    /// Performs what the machine says until it waits; false once it closed.
    func drain() {
        while let action = machine.next() {
            switch action {
            case .perform(let request, _): performing.append(request)
            case .write(let buffers): machine.bytesWritten(buffers.reduce(0) { $0 + $1.readableBytes })
            case .close, .fatal: ended = true
            case .pauseReading, .resumeReading, .armTimer, .cancelTimer: break
            case .reserveMemory(let amount): if ledger.reserve(0, amount) { machine.memoryGranted() }
            case .adjustMemory(let delta): if ledger.adjust(0, by: delta).contains(0) { machine.memoryGranted() }
            }
            // Answer the oldest now and then, as a backend would, each kind of reply; and now
            // and then the other connection frees what it holds.
            if performing.count > Int(input.byte() % 4) {
                let request = performing.removeFirst()
                machine.requestCompleted(request, reply(to: request, choice: input.byte()))
            }
            if input.byte() % 8 == 0, ledger.adjust(1, by: -ledger.holding(1)).contains(0) { machine.memoryGranted() }
        }
    }
    while !ended, let piece = input.piece() {
        machine.bytesReceived(piece)
        drain()
    }
    for request in performing { machine.requestCompleted(request, reply(to: request, choice: 0)) }
    performing = []
    drain()
    machine.timerFired()
    // The connection ends: whatever it held, and any wait, goes back to the budget.
    machine.channelClosed()
    drain()
    if ledger.adjust(1, by: -ledger.holding(1)).contains(0) { machine.memoryGranted() }
    for request in performing { machine.requestCompleted(request, reply(to: request, choice: 0)) }
    drain()
    precondition(ledger.holding(0) == 0, "the connection kept \(ledger.holding(0)) bytes of the budget after it ended")
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
