import Foundation
import NBD

/// What `nbd info` learns about a server and its exports during negotiation, and how it
/// prints it: as nbdinfo's text, or as JSON with nbdinfo's keys in nbdinfo's order.
struct ServerReport: Sendable {
    struct Export: Sendable {
        var uri: NBDURI
        var info: NBDExportInfo
        var contexts: [String]
    }

    var format: TransmissionFormat
    var tls: Bool
    var exports: [Export]

    /// Connects, negotiates extended headers or structured replies (as the configuration
    /// allows), and describes one export (or, with `listing`,
    /// every export the server lists), then ends the negotiation with NBD_OPT_ABORT.
    static func gather(_ uri: NBDURI, listing: Bool, configuration: NBDClientConfiguration) async throws -> ServerReport {
        let connection = try await NBDConnection.connect(to: uri, configuration: configuration)
        let tls = await connection.isTLS
        let format = try await connection.negotiateFormat(upTo: configuration.transmissionFormat)
        let names = listing ? try await connection.list().map(\.name) : [uri.exportName]
        var exports: [Export] = []
        for name in names {
            var contexts: [String] = []
            if format.hasChunks {
                contexts = (try? await connection.listMetaContexts(for: name).map(\.name)) ?? []
            }
            var exportURI = uri
            exportURI.exportName = name
            do {
                let info = try await connection.info(name)
                exports.append(Export(uri: exportURI, info: info, contexts: contexts))
            } catch let error as NBDError where error.optionReply == .errUnsupported && !listing {
                // A server without NBD_OPT_INFO: enter transmission to learn size and flags.
                let export = try await connection.go(name)
                let info = export.info
                await export.disconnect()
                return ServerReport(
                    format: format,
                    tls: tls,
                    exports: [Export(uri: exportURI, info: info, contexts: contexts)]
                )
            }
        }
        await connection.abort()
        return ServerReport(format: format, tls: tls, exports: exports)
    }

    /// nbdinfo's boolean fields, in its order, each true or false as nbdinfo prints them; and
    /// `can_resize`, which nbdinfo does not know, in the alphabetical place nbdinfo's would take.
    static func flags(_ info: NBDExportInfo) -> [(String, Bool)] {
        [
            ("is_rotational", info.isRotational), ("is_read_only", info.isReadOnly),
            ("can_block_status_payload", info.canBlockStatusPayload), ("can_cache", info.canCache),
            ("can_df", info.canDF), ("can_fast_zero", info.canFastZero), ("can_flush", info.canFlush),
            ("can_fua", info.canFUA), ("can_multi_conn", info.canMultiConn), ("can_resize", info.canResize),
            ("can_trim", info.canTrim), ("can_zero", info.canZero),
        ]
    }

    static func blockSizes(_ info: NBDExportInfo) -> [(String, UInt32)] {
        guard let sizes = info.advertisedBlockSizes else { return [] }
        return [("block_size_minimum", sizes.minimum), ("block_size_preferred", sizes.preferred), ("block_size_maximum", sizes.maximum)]
    }

    var text: String {
        var out = "protocol: newstyle-fixed \(tls ? "with" : "without") TLS, using \(format) packets\n"
        for export in exports {
            out += "export=\(JSON.quote(export.info.name)):\n"
            if let description = export.info.description { out += "\tdescription: \(description)\n" }
            out += "\texport-size: \(Self.sizeText(export.info.size))\n"
            out += "\turi: \(export.uri)\n"
            if !export.contexts.isEmpty {
                out += "\tcontexts:\n"
                for context in export.contexts { out += "\t\t\(context)\n" }
            }
            for (key, value) in Self.flags(export.info) { out += "\t\(key): \(value)\n" }
            for (key, value) in Self.blockSizes(export.info) { out += "\t\(key): \(Self.sizeText(UInt64(value)))\n" }
        }
        return out
    }

    var json: String {
        var out = "{\n\"protocol\": \"newstyle-fixed\",\n\"TLS\": \(tls),\n\"structured\": \(format.hasChunks),\n"
        out += "\"extended\": \(format == .extended),\n\"exports\": ["
        out += exports.map { export in
            var fields = ["\t\"export-name\": \(JSON.quote(export.info.name)),"]
            if let description = export.info.description { fields.append("\t\"description\": \(JSON.quote(description)),") }
            fields.append("\t\"uri\": \(JSON.quote(export.uri.description)),")
            if !export.contexts.isEmpty {
                fields.append("\t\"contexts\": [\n" + export.contexts.map { "\t\t\(JSON.quote($0))" }.joined(separator: ",\n") + "\n\t],")
            }
            for (key, value) in Self.flags(export.info) { fields.append("\t\"\(key)\": \(value),") }
            for (key, value) in Self.blockSizes(export.info) { fields.append("\t\"\(key)\": \(value),") }
            fields.append("\t\"export-size\": \(export.info.size),")
            fields.append("\t\"export-size-str\": \(JSON.quote(Self.humanSize(export.info.size)))")
            return "\n\t{\n" + fields.joined(separator: "\n") + "\n\t}"
        }.joined(separator: ",")
        out += " ]\n}\n"
        return out
    }

    /// A size in bytes, with its human form in brackets when that differs: `4096 (4K)`, `1`.
    static func sizeText(_ bytes: UInt64) -> String {
        let human = humanSize(bytes)
        return human == "\(bytes)" ? human : "\(bytes) (\(human))"
    }

    /// Sizes as nbdinfo prints them: the largest unit that divides exactly (`64M`), else bytes.
    static func humanSize(_ bytes: UInt64) -> String { ByteCount.exactText(bytes) }
}

/// Just enough JSON writing for nbdinfo's layout.
enum JSON {
    static func quote(_ text: String) -> String {
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\t": out += "\\t"
            case "\r": out += "\\r"
            case _ where scalar.value < 0x20: out += String(format: "\\u%04x", scalar.value)
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }
}
