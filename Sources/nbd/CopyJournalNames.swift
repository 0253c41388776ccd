import Foundation
import NBDCopy

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

extension CopyJournal {
    /// How the journal names a source or destination: a file by its full path, so that a copy
    /// started again from another folder is still recognised; anything else as given.
    static func name(of argument: String) -> String {
        let given = Endpoints.isURI(argument) || argument == "-" || ["pattern:", "zero:", "null:"].contains { argument.hasPrefix($0) }
        guard !given, let resolved = realpath(argument, nil) else { return argument }
        defer { free(resolved) }
        return String(cString: resolved)
    }

    /// Before a resumed copy opens its destination: the source (open already) must be the
    /// journal's, and so must the destination; a file must still be there, of the size the
    /// journal recorded (opening it could otherwise create or extend it).
    static func requireResumable(
        _ record: Record,
        source: String,
        sourceSize: UInt64?,
        destination: String,
        journal path: String
    ) throws {
        let subject = record.subject
        guard name(of: source) == subject.source, sourceSize == subject.sourceSize else {
            throw NBDCopyError(
                .journal,
                "the journal \(path) is for a copy of \(subject.source) (\(subject.sourceSize) bytes), "
                    + "not of \(source) (\(sourceSize.map { "\($0) bytes" } ?? "a stream")): remove it to start over"
            )
        }
        guard name(of: destination) == subject.destination else {
            throw NBDCopyError(
                .journal,
                "the journal \(path) is for a copy onto \(subject.destination), not onto \(destination): remove it to start over"
            )
        }
        guard !Endpoints.isURI(destination) else { return }
        guard let file = Endpoints.onDisk(destination) else {
            throw NBDCopyError(
                .journal,
                "the journal \(path) is for a copy onto \(subject.destination), which is not there: remove it to start over"
            )
        }
        if let actual = file.regularSize, actual != subject.destinationSize {
            throw NBDCopyError(
                .journal,
                "the journal \(path) is for a copy onto \(subject.destination) of \(subject.destinationSize) bytes, "
                    + "and \(destination) has \(actual): remove the journal to start over"
            )
        }
    }
}
