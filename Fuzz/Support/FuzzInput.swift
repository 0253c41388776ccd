import NIOCore

/// The fuzzer's bytes, taken from the front: a few to choose a scenario, the rest as a peer's
/// stream, handed over in pieces whose sizes the input also chooses.
public struct FuzzInput {
    private var bytes: ArraySlice<UInt8>

    public init(_ start: UnsafePointer<UInt8>, _ count: Int) {
        bytes = Array(UnsafeBufferPointer(start: start, count: count))[...]
    }

    public var isEmpty: Bool { bytes.isEmpty }

    /// The next byte, or 0 once the input is used up.
    public mutating func byte() -> UInt8 { bytes.popFirst() ?? 0 }

    public mutating func bool() -> Bool { byte() & 1 == 1 }

    /// A number from the next four bytes (big-endian), 0 past the end.
    public mutating func uint32() -> UInt32 {
        (0..<4).reduce(UInt32(0)) { value, _ in value << 8 | UInt32(byte()) }
    }

    /// The next piece of the stream: a size byte, then up to that many bytes (1 to 256).
    public mutating func piece() -> ByteBuffer? {
        guard !bytes.isEmpty else { return nil }
        let size = min(bytes.count, 1 + Int(byte()))
        let taken = bytes.prefix(size)
        bytes = bytes.dropFirst(size)
        return ByteBuffer(bytes: taken)
    }

    /// Everything left, at once.
    public mutating func rest() -> ByteBuffer {
        defer { bytes = [] }
        return ByteBuffer(bytes: bytes)
    }
}

/// libFuzzer's entry point (`FuzzerDriver.cpp`): it parses the command line and runs `test`
/// on every input. The C function's arguments are plain pointers, passed alike by Swift.
@_silgen_name("LLVMFuzzerRunDriver")
private func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<CInt>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
    _ test: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt
) -> CInt

/// Runs libFuzzer with the process's arguments. SwiftPM links an executable's `main` to a
/// symbol of its own (`MODULE_main`); each target defines that symbol to call this.
public func runFuzzer(
    _ argc: CInt,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?,
    _ test: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt
) -> CInt {
    var argc = argc
    var argv = argv
    return LLVMFuzzerRunDriver(&argc, &argv, test)
}
