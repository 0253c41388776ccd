#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// The C library's socket calls under names that are the same on Linux and macOS; the bare
// names clash with Swift methods of the same name inside types.

#if canImport(Glibc)
let socketStream = Int32(SOCK_STREAM.rawValue)
let systemConnect = Glibc.connect
let systemRead = Glibc.read
let systemClose = Glibc.close
#else
let socketStream = SOCK_STREAM
let systemConnect = Darwin.connect
let systemRead = Darwin.read
let systemClose = Darwin.close
#endif

/// The text of a C library error number.
func errorText(_ code: Int32) -> String { String(cString: strerror(code)) }
