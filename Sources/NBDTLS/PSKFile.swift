@_spi(NBDMachines) import NBDCore

/// A pre-shared key file in psktool's format, as nbdkit and qemu read it: `username:hexkey`
/// lines. The client takes one user's key from it, the server every user's.
package enum PSKFile {
    /// Every user's key in `text`, the contents of the file at `path` (named in errors); the
    /// first line of a user counts. An empty file, or a line that is not `username:hexkey`,
    /// is refused.
    package static func keys(in text: String, path: String) throws(NBDError) -> [String: [UInt8]] {
        var keys: [String: [UInt8]] = [:]
        for (number, line) in text.split(whereSeparator: \.isNewline).enumerated() where !line.isEmpty {
            let parts = line.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false)
            guard parts.count == 2, !parts[0].isEmpty else {
                throw NBDError(.tlsFailed, "line \(number + 1) of the PSK file \(path) is not username:hexkey", connectionUsable: false)
            }
            let user = String(parts[0])
            if keys[user] == nil { keys[user] = try key(of: user, in: String(line), path: path) }
        }
        guard !keys.isEmpty else { throw NBDError(.tlsFailed, "the PSK file \(path) holds no key", connectionUsable: false) }
        return keys
    }

    /// The key of `username` in `text`, the contents of the file at `path` (named in errors).
    package static func key(of username: String, in text: String, path: String) throws(NBDError) -> [UInt8] {
        for line in text.split(whereSeparator: \.isNewline) {
            let parts = line.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false)
            guard parts.count == 2, parts[0] == username else { continue }
            let hex = Array(parts[1].utf8)
            guard !hex.isEmpty else {
                throw NBDError(.tlsFailed, "the PSK of \(username) in \(path) is empty", connectionUsable: false)
            }
            guard hex.count % 2 == 0 else {
                throw NBDError(.tlsFailed, "the PSK of \(username) in \(path) is not hexadecimal", connectionUsable: false)
            }
            var key: [UInt8] = []
            key.reserveCapacity(hex.count / 2)
            for index in stride(from: 0, to: hex.count, by: 2) {
                guard let high = digit(hex[index]), let low = digit(hex[index + 1]) else {
                    throw NBDError(.tlsFailed, "the PSK of \(username) in \(path) is not hexadecimal", connectionUsable: false)
                }
                key.append(high << 4 | low)
            }
            return key
        }
        throw NBDError(.tlsFailed, "no PSK for user \(username) in \(path)", connectionUsable: false)
    }

    private static func digit(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): byte - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): byte - UInt8(ascii: "A") + 10
        default: nil
        }
    }
}
