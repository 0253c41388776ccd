import Foundation
import NBDCopy

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// How `nbd copy --resume` names the ends of its copy in the journal, and what it checks of a
/// file destination before opening it.
enum CopyJournalNames {
    /// How the journal names a source or destination: a file by its full path, so that a copy
    /// started again from another folder is still recognised; anything else as given.
    static func name(of argument: String) -> String {
        let given = Endpoints.isURI(argument) || argument == "-" || ["pattern:", "zero:", "null:"].contains { argument.hasPrefix($0) }
        guard !given, let resolved = realpath(argument, nil) else { return argument }
        defer { free(resolved) }
        return String(cString: resolved)
    }

    /// Before a resumed copy opens its destination (opening could create or extend it): a
    /// file must still be there, of the size the journal recorded.
    static func requireDestination(of recorded: RecordedCopy, destination: String, journal path: String) throws {
        guard !Endpoints.isURI(destination) else { return }
        guard let file = Endpoints.onDisk(destination) else {
            throw NBDCopyError(
                .journal,
                "the journal \(path) is for a copy onto \(recorded.destination), which is not there: remove it to start over"
            )
        }
        if let actual = file.regularSize, actual != recorded.destinationSize {
            throw NBDCopyError(
                .journal,
                "the journal \(path) is for a copy onto \(recorded.destination) of \(recorded.destinationSize) bytes, "
                    + "and \(destination) has \(actual): remove the journal to start over"
            )
        }
    }
}
