import ArgumentParser
import Foundation
import NBD

/// `nbd info`: what nbdinfo prints, with the same keys.
struct Info: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Describe an export, list exports, or map its extents (like nbdinfo).",
        discussion: """
            Stays in the negotiation phase (NBD_OPT_INFO) except for --map.

            Examples:
              nbd info nbd://localhost/disk
              nbd info --json nbd+unix:///?socket=/tmp/nbd.sock
              nbd info --list nbd://localhost
              nbd info --size nbd://localhost/disk
              nbd info --can trim nbd://localhost/disk && echo "trim works"
              nbd info --has extended-headers nbd://localhost/disk
              nbd info --map nbd://localhost/disk
              nbd info --map=qemu:dirty-bitmap:bitmap0 --totals nbd://localhost/disk
            """
    )

    @Argument(help: "The export, as an NBD URI.")
    var uri: String

    @Flag(help: "Print JSON with nbdinfo's keys.")
    var json = false

    @Flag(help: "List every export the server lists, with its details.")
    var list = false

    @Flag(help: "Print only the size in bytes.")
    var size = false

    @Option(
        name: [.customLong("can"), .customLong("has")],
        help: ArgumentHelp("Exit 0 if the export can FEATURE (or has it), 2 if not.", valueName: "feature")
    )
    var can: String?

    @Option(
        name: [.customLong("cannot"), .customLong("hasnt")],
        help: ArgumentHelp("Exit 0 if the export cannot FEATURE (or lacks it), 2 if it can.", valueName: "feature")
    )
    var cannot: String?

    @Option(
        name: .customLong("is"),
        help: ArgumentHelp("Exit 0 if the export is PROPERTY (read-only, rotational, tls), 2 if not.", valueName: "property")
    )
    var isProperty: String?

    @Option(name: .customLong("isnt"), help: ArgumentHelp("Exit 0 if the export is not PROPERTY, 2 if it is.", valueName: "property"))
    var isntProperty: String?

    @Option(help: ArgumentHelp("Map the extents of a metadata context (--map alone: base:allocation).", valueName: "context"))
    var map: String?

    @Flag(help: "With --map: print the total size of each type instead of the extents.")
    var totals = false

    @OptionGroup var connection: ConnectionOptions

    func validate() throws {
        let modes = [list, size, can != nil, cannot != nil, isProperty != nil, isntProperty != nil, map != nil].filter { $0 }.count
        guard modes <= 1 else { throw ValidationError("choose one of --list, --size, --can, --cannot, --is, --isnt, --map") }
        guard !totals || map != nil else { throw ValidationError("--totals needs --map") }
        for feature in [can, cannot].compactMap({ $0 }) where Self.features[feature] == nil {
            throw ValidationError(
                "unknown feature \"\(feature)\" for --can (one of \(Self.features.keys.sorted().joined(separator: ", ")))"
            )
        }
        for property in [isProperty, isntProperty].compactMap({ $0 }) where Self.properties[property] == nil {
            throw ValidationError(
                "unknown property \"\(property)\" for --is (one of \(Self.properties.keys.sorted().joined(separator: ", ")))"
            )
        }
    }

    func run() async throws {
        let uri = try NBDURI(self.uri)
        if let context = map {
            try await runMap(context: NBDMetaContext(context))
            return
        }
        let report = try await ServerReport.gather(uri, listing: list, configuration: connection.configuration())
        if size {
            StandardStreams.output("\(report.exports[0].info.size)\n")
        } else if let feature = can ?? cannot {
            try answer(Self.features[feature]!(report, report.exports[0]) == (can != nil))
        } else if let property = isProperty ?? isntProperty {
            try answer(Self.properties[property]!(report, report.exports[0]) == (isProperty != nil))
        } else {
            StandardStreams.output(json ? report.json : report.text)
        }
    }

    private func answer(_ truth: Bool) throws {
        if !truth { throw ExitCode(2) }
    }

    private func runMap(context: NBDMetaContext) async throws {
        let extents = try await connection.withSingleClient(self.uri, metaContexts: [context]) { client, _ in
            guard try await client.hasMetaContext(context) else {
                throw CommandError("--map: server does not support metadata context \"\(context.name)\"")
            }
            return try await ExtentMap.read(client, context: context)
        }
        let map = ExtentMap(context: context, extents: extents)
        StandardStreams.output(totals ? (json ? map.totalsJSON : map.totalsText) : (json ? map.json : map.text))
    }

    typealias Question = @Sendable (ServerReport, ServerReport.Export) -> Bool

    /// `--can` features, named as nbdinfo names them.
    static let features: [String: Question] = [
        "connect": { _, _ in true },
        "tls": { report, _ in report.tls },
        "structured-reply": { report, _ in report.format.hasChunks },
        "extended-headers": { report, _ in report.format == .extended },
        "block-status-payload": { $1.info.canBlockStatusPayload },
        "read": { _, _ in true }, "write": { !$1.info.isReadOnly },
        "flush": { $1.info.canFlush }, "fua": { $1.info.canFUA }, "trim": { $1.info.canTrim },
        "zero": { $1.info.canZero }, "fast-zero": { $1.info.canFastZero }, "df": { $1.info.canDF },
        "multi-conn": { $1.info.canMultiConn }, "cache": { $1.info.canCache }, "resize": { $1.info.canResize },
        "block-status": { !$1.contexts.isEmpty },
    ]

    /// `--is` properties.
    static let properties: [String: Question] = [
        "read-only": { $1.info.isReadOnly }, "rotational": { $1.info.isRotational }, "tls": { report, _ in report.tls },
    ]
}
