import FuzzSupport
@_spi(NBDMachines) import NBDCore
import NIOCore

/// The server's bytes while the client negotiates: the greeting and the replies to options the
/// input chooses, through the client's connection machine.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzClientNegotiation(_ start: UnsafePointer<UInt8>, _ count: Int) -> CInt {
    var input = FuzzInput(start, count)
    let options: [OptionRequest] = [
        .list, .structuredReply, .info(export: "disk", requests: [.name, .description, .blockSize]),
        .setMetaContext(export: "disk", queries: ["base:allocation", "qemu:dirty-bitmap:b"]),
        .listMetaContext(export: "", queries: []), .go(export: "disk", requests: [.blockSize]), .exportName("disk"), .abort,
        .extendedHeaders,
    ]
    var script = (0..<4).map { _ in options[Int(input.byte()) % options.count] }[...]
    let policy: NBDTLSPolicy = [.disable, .allow, .require][Int(input.byte()) % 3]
    var machine = ClientConnectionStateMachine<Handle, Handle>(configuration: .init(tlsPolicy: policy), handshakeWaiter: Handle())
    machine.channelActive()
    var nextOption = false
    while true {
        while let action = machine.next() {
            switch action {
            case .succeed, .fail: nextOption = true
            case .startTLS: machine.tlsEstablished(version: "tlsv13", cipherSuite: nil)
            case .closeAndFail, .close, .sendDisconnect: return 0
            default: break
            }
        }
        if nextOption, let option = script.popFirst() {
            nextOption = false
            machine.optionRequested(option, waiter: Handle())
            continue
        }
        guard let piece = input.piece() else { break }
        machine.bytesReceived(piece)
    }
    machine.timerFired()
    while machine.next() != nil {}
    return 0
}

final class Handle {}

@_cdecl("FuzzClientNegotiation_main")
public func main(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    runFuzzer(argc, argv) { data, count in fuzzClientNegotiation(data ?? UnsafePointer(bitPattern: 1)!, count) }
}
