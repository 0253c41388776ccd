import FuzzSupport
import NBDCore
import NIOCore

/// The server's replies to a table of requests in flight that the input builds: every check
/// of a reply against its request, simple, structured, block status and errors.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzClientTransmission(_ start: UnsafePointer<UInt8>, _ count: Int) -> CInt {
    var input = FuzzInput(start, count)
    let structured = input.bool()
    var machine = ClientTransmissionStateMachine<Int>(configuration: .init(structuredReplies: structured, metaContextIDs: [1, 2]))
    let types: [CommandType] = [.read, .write, .flush, .trim, .writeZeroes, .blockStatus, .cache, CommandType(rawValue: 99)]
    for index in 0..<(1 + Int(input.byte()) % 16) {
        let type = types[Int(input.byte()) % types.count]
        let flags: CommandFlags = input.bool() ? .requestOne : []
        let offset = UInt64(input.uint32()) << 9
        let length = input.uint32() % (1 << 20)
        _ = machine.startRequest(type, flags: flags, offset: offset, length: length, context: index)
    }
    while let piece = input.piece() {
        machine.feed(piece)
        while let action = machine.next() {
            if case .fatal = action { return 0 }
        }
    }
    _ = machine.connectionClosed(NBDError(.connectionClosed, "end of input", connectionUsable: false))
    return 0
}

@_cdecl("FuzzClientTransmission_main")
public func main(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    runFuzzer(argc, argv) { data, count in fuzzClientTransmission(data ?? UnsafePointer(bitPattern: 1)!, count) }
}
