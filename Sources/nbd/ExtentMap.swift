import Foundation
import NBD

/// The extents of one metadata context over a whole export, merged and printed as
/// `nbdinfo --map` prints them.
struct ExtentMap: Sendable {
    struct Entry: Sendable, Equatable {
        var offset: UInt64
        var length: UInt64
        var type: UInt64
    }

    var context: String
    var extents: [Entry]

    /// The extents of `context` over the whole export, neighbours of the same type merged.
    static func read(_ export: NBDExport, context: String) async throws -> [Entry] {
        var entries: [Entry] = []
        for try await extent in export.extents(of: context) {
            if let previous = entries.last, previous.type == extent.flags, previous.offset + previous.length == extent.offset {
                entries[entries.count - 1].length += extent.length
            } else {
                entries.append(Entry(offset: extent.offset, length: extent.length, type: extent.flags))
            }
        }
        return entries
    }

    /// What nbdinfo calls each type, by context.
    func describe(_ type: UInt64) -> String {
        if context == NBDMetaContext.baseAllocation {
            return ["data", "hole", "zero", "hole,zero"][Int(type & 3)]
        } else if context.hasPrefix("qemu:dirty-bitmap:") {
            return type & 1 != 0 ? "dirty" : "clean"
        } else if context == "qemu:allocation-depth" {
            switch type {
            case 0: return "unallocated"
            case 1: return "local"
            default: return "backing depth \(type)"
            }
        }
        return ""
    }

    var text: String {
        extents.map { String(format: "%10llu  %10llu  %3llu  %@", $0.offset, $0.length, $0.type, describe($0.type)) + "\n" }.joined()
    }

    var json: String {
        "[\n"
            + extents.map {
                "{ \"offset\": \($0.offset), \"length\": \($0.length), \"type\": \($0.type), "
                    + "\"description\": \(JSON.quote(describe($0.type)))}"
            }.joined(separator: ",\n") + "\n]\n"
    }

    /// Total size of each type, in order of type.
    var totals: [(type: UInt64, size: UInt64, percent: Double)] {
        let whole = extents.reduce(UInt64(0)) { $0 + $1.length }
        let sums = Dictionary(extents.map { ($0.type, $0.length) }, uniquingKeysWith: +)
        return sums.keys.sorted().map { ($0, sums[$0]!, whole == 0 ? 0 : Double(sums[$0]!) * 100 / Double(whole)) }
    }

    var totalsText: String {
        totals.map { String(format: "%10llu %5.1f%% %3llu %@", $0.size, $0.percent, $0.type, describe($0.type)) + "\n" }.joined()
    }

    var totalsJSON: String {
        "[\n"
            + totals.map {
                "{ \"size\": \($0.size), \"percent\": \(String(format: "%g", $0.percent)), \"type\": \($0.type), "
                    + "\"description\": \(JSON.quote(describe($0.type))) }"
            }.joined(separator: ",\n") + "\n]\n"
    }
}
