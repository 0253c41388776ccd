import NBD

/// libnbd's tools' `[ CMD ARGS ... ]`: wherever an export goes, a server command in brackets
/// is started for the run by systemd socket activation (`NBDServerCommand`), and its URI
/// takes the place of the brackets; the servers are stopped when the tool ends.
///
///     nbd info [ nbdkit memory 1G ]
///     nbd copy [ qemu-nbd -f qcow2 disk.qcow2 ] out.raw
final class ServerCommands: @unchecked Sendable {
    /// Touched by `main` alone, one step after another.
    private var started: [NBDServerCommand] = []

    /// `arguments` with every bracketed command started and replaced by its URI.
    func start(in arguments: [String]) async throws -> [String] {
        var result: [String] = []
        var index = arguments.startIndex
        while index < arguments.endIndex {
            guard arguments[index] == "[" else {
                result.append(arguments[index])
                index += 1
                continue
            }
            guard let close = arguments[index...].firstIndex(of: "]") else {
                throw CommandError("a server command opened with \"[\" needs a closing \"]\"")
            }
            let command = Array(arguments[(index + 1)..<close])
            guard !command.isEmpty else { throw CommandError("\"[ ]\" holds no server command") }
            guard !command.contains("[") else { throw CommandError("server commands in brackets cannot nest") }
            let server = try NBDServerCommand(command)
            started.append(server)
            result.append(server.uri.description)
            index = close + 1
        }
        return result
    }

    /// `error`, or one that says a server command died, when one did: that is why.
    func explain(_ error: any Error) async -> any Error {
        for server in started {
            if let status = server.exitStatus {
                return CommandError("the server command \(server.command.joined(separator: " ")) exited with status \(status)")
            }
        }
        return error
    }

    /// Stops every server started.
    func stop() async {
        for server in started { await server.stop() }
        started = []
    }
}
