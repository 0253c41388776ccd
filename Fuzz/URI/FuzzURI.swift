import FuzzSupport

/// NBD URIs from any text: either a typed error, or a URI that prints back to an equal one.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzURI(_ start: UnsafePointer<UInt8>, _ count: Int) -> CInt {
    let text = String(decoding: UnsafeBufferPointer(start: start, count: count), as: UTF8.self)
    guard let uri = try? NBDURI(text) else { return 0 }
    guard let again = try? NBDURI(uri.description), again == uri else {
        fatalError("\(text) parsed, but its description \(uri.description) does not parse back to it")
    }
    _ = uri.address
    return 0
}

@_cdecl("FuzzURI_main")
public func main(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    runFuzzer(argc, argv) { data, count in fuzzURI(data ?? UnsafePointer(bitPattern: 1)!, count) }
}
