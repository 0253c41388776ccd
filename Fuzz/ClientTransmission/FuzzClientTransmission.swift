import FuzzSupport
@_spi(NBDMachines) import NBDCore
import NIOCore

/// The server's replies to a table of requests in flight that the input builds: every check
/// of a reply against its request, in the three formats (simple, structured, extended):
/// chunks, block status of 32 and 64 bits, filtered block status, and errors.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzClientTransmission(_ start: UnsafePointer<UInt8>, _ count: Int) -> CInt {
    var input = FuzzInput(start, count)
    let format = TransmissionFormat(rawValue: Int(input.byte() % 3))!
    var machine = ClientTransmissionStateMachine<Int>(
        configuration: .init(format: format, metaContextIDs: [1, 2], narrowStatusContextIDs: [1])
    )
    let types: [CommandType] = [.read, .write, .flush, .trim, .writeZeroes, .blockStatus, .cache, CommandType(rawValue: 99)]
    for index in 0..<(1 + Int(input.byte()) % 16) {
        let type = types[Int(input.byte()) % types.count]
        let flags: CommandFlags = input.bool() ? .requestOne : []
        let offset = UInt64(input.uint32()) << 9
        var length = UInt64(input.uint32() % (1 << 20))
        // With extended headers, effect lengths past 32 bits.
        if format == .extended, type != .read, type != .write, input.bool() { length <<= 24 }
        let only: [UInt32]? = format == .extended && type == .blockStatus && input.bool() ? [2] : nil
        let header = machine.startRequest(type, flags: flags, offset: offset, length: length, onlyContexts: only, context: index)
        var sent = ByteBuffer()
        machine.encode(header, into: &sent)
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
