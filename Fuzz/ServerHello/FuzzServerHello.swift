import FuzzSupport
import NIOCore

/// The first bytes a TLS server sends, read for the cipher suite.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzServerHello(_ start: UnsafePointer<UInt8>, _ count: Int) -> CInt {
    let bytes = ByteBuffer(bytes: UnsafeBufferPointer(start: start, count: count))
    if case .found(let suite) = TLSServerHello.cipherSuite(in: bytes) { _ = TLSServerHello.name(of: suite) }
    return 0
}

@_cdecl("FuzzServerHello_main")
public func main(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    runFuzzer(argc, argv) { data, count in fuzzServerHello(data ?? UnsafePointer(bitPattern: 1)!, count) }
}
