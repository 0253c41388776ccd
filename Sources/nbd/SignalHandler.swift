import Dispatch

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Runs an action when one of some signals arrives (Ctrl-C, SIGTERM), instead of dying.
final class SignalHandler: @unchecked Sendable {
    private let sources: [DispatchSourceSignal]

    init(_ signals: [Int32], action: @escaping @Sendable () -> Void) {
        sources = signals.map { number in
            // A parent may have started us with the signal blocked (children of Swift
            // concurrency threads inherit such a mask): unblock it, or it would never arrive.
            var set = sigset_t()
            sigemptyset(&set)
            sigaddset(&set, number)
            pthread_sigmask(SIG_UNBLOCK, &set, nil)
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number)
            source.setEventHandler(handler: action)
            source.resume()
            return source
        }
    }

    deinit {
        for source in sources { source.cancel() }
    }
}
