import FuzzSupport
@_spi(NBDMachines) import NBDCore
import NIOCore

/// A client's bytes while the server negotiates: a TLS mode (the first byte: off, on or
/// require), then the client's flags and any options. STARTTLS's handshake succeeds at once.
/// Under require, nothing but STARTTLS, ABORT and TLS_REQD errors may be sent before TLS, and
/// transmission never starts; once TLS is up, NBD_REP_ERR_TLS_REQD is never sent.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzServerNegotiation(_ start: UnsafePointer<UInt8>, _ count: Int) -> CInt {
    var input = FuzzInput(start, count)
    let mode = [NBDServerTLSMode.off, .on, .require][Int(input.byte() % 3)]
    let sizes = BlockSizeConstraints(minimum: 1, preferred: 4096, maximum: 65536)
    var machine = ServerNegotiationStateMachine(
        exports: [
            .init(name: "", size: 1 << 20, flags: [.hasFlags, .sendFlush], blockSizes: sizes),
            .init(name: "disk", description: "a disk", size: 1 << 30, flags: [.hasFlags, .readOnly], blockSizes: sizes),
        ],
        maximumOptionLength: 4096,
        tlsMode: mode
    )
    var buffer = ByteBuffer()
    while let piece = input.piece() {
        buffer.writeImmutableBuffer(piece)
        while true {
            let wasTLS = machine.isTLS
            switch machine.receive(&buffer) {
            case .wait: break
            case .send(var bytes):
                while let reply = try? OptionReply.decode(from: &bytes, maximumLength: 1 << 20) {
                    var tlsRequired = false
                    if case .error(let type, _) = reply.body { tlsRequired = type == .errTLSRequired }
                    precondition(!(wasTLS && tlsRequired), "NBD_REP_ERR_TLS_REQD over TLS")
                    precondition(mode == .require || !tlsRequired, "NBD_REP_ERR_TLS_REQD without --tls=require")
                    if mode == .require, !wasTLS { precondition(tlsRequired, "\(reply.body) in clear under require") }
                }
                continue
            case .startTLS:
                precondition(mode != .off && !wasTLS, "STARTTLS accepted twice, or with TLS off")
                machine.tlsEstablished()
                continue
            case .enterTransmission:
                precondition(mode != .require || wasTLS, "transmission in clear under require")
                return 0
            case .close, .fatal: return 0
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
