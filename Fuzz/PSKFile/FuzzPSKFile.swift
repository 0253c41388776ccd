import FuzzSupport

/// Pre-shared key files in psktool's format, with any contents.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzPSKFile(_ start: UnsafePointer<UInt8>, _ count: Int) -> CInt {
    let text = String(decoding: UnsafeBufferPointer(start: start, count: count), as: UTF8.self)
    for user in ["alice", "", "bob:x"] {
        if let key = try? PSKFile.key(of: user, in: text, path: "keys.psk") {
            precondition(!key.isEmpty, "an empty key was accepted")
        }
    }
    // The server's reading: every user's key, each as the client would read it.
    if let keys = try? PSKFile.keys(in: text, path: "keys.psk") {
        for (user, key) in keys {
            precondition(!user.isEmpty && !user.contains(":") && !key.isEmpty, "a bad line was accepted")
            precondition((try? PSKFile.key(of: user, in: text, path: "keys.psk")) == key, "the client and the server read \(user) apart")
        }
    }
    return 0
}

@_cdecl("FuzzPSKFile_main")
public func main(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    runFuzzer(argc, argv) { data, count in fuzzPSKFile(data ?? UnsafePointer(bitPattern: 1)!, count) }
}
