import FuzzSupport
import NBDCore
import NIOCore

/// A client's bytes while the server negotiates: flags, then any options.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzServerNegotiation(_ start: UnsafePointer<UInt8>, _ count: Int) -> CInt {
    var input = FuzzInput(start, count)
    let sizes = BlockSizeConstraints(minimum: 1, preferred: 4096, maximum: 65536)
    var machine = ServerNegotiationStateMachine(
        exports: [
            .init(name: "", size: 1 << 20, flags: [.hasFlags, .sendFlush], blockSizes: sizes),
            .init(name: "disk", description: "a disk", size: 1 << 30, flags: [.hasFlags, .readOnly], blockSizes: sizes),
        ],
        maximumOptionLength: 4096
    )
    var buffer = ByteBuffer()
    while let piece = input.piece() {
        buffer.writeImmutableBuffer(piece)
        while true {
            switch machine.receive(&buffer) {
            case .wait: break
            case .send: continue
            case .enterTransmission, .close, .fatal: return 0
            }
            break
        }
    }
    return 0
}

@_cdecl("FuzzServerNegotiation_main")
public func main(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    runFuzzer(argc, argv) { data, count in fuzzServerNegotiation(data ?? UnsafePointer(bitPattern: 1)!, count) }
}
