import Dispatch

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Runs an action when one of some signals arrives (Ctrl-C, SIGTERM), instead of dying.
final class SignalHandler: @unchecked Sendable {
    private let sources: [DispatchSourceSignal]

    /// Lets `signals` through to this thread: a parent may have started us with them blocked
    /// (children of Swift concurrency threads inherit such a mask), and then none would arrive.
    static func unblock(_ signals: [Int32]) {
        var set = sigset_t()
        sigemptyset(&set)
        for number in signals { sigaddset(&set, number) }
        pthread_sigmask(SIG_UNBLOCK, &set, nil)
    }

    init(_ signals: [Int32], action: @escaping @Sendable () -> Void) {
        Self.unblock(signals)
        sources = signals.map { number in
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
