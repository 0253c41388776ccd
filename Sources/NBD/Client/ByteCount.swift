/// Byte counts as people write them: a number with an optional K, M, G or T suffix (powers
/// of 1024), as nbdkit, nbdcopy and qemu-img take them. The one size parser of the package.
package enum ByteCount {
    package enum Failure: Error { case notANumber, tooLarge }

    package static func parse(_ text: String) -> Result<UInt64, Failure> {
        let units: [Character: UInt64] = [
            "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
        ]
        var digits = Substring(text)
        var unit: UInt64 = 1
        if let last = text.last, let multiplier = units[last] {
            unit = multiplier
            digits = digits.dropLast()
        }
        guard !digits.isEmpty, digits.allSatisfy({ $0.isASCII && $0.isNumber }), let number = UInt64(digits) else {
            return .failure(.notANumber)
        }
        let (bytes, overflow) = number.multipliedReportingOverflow(by: unit)
        return overflow ? .failure(.tooLarge) : .success(bytes)
    }

    /// A size as nbdinfo prints it: the largest unit that divides exactly (`64M`), else bytes.
    package static func exactText(_ bytes: UInt64) -> String {
        var value = bytes
        var unit = 0
        let units = ["", "K", "M", "G", "T", "P", "E"]
        while value != 0, value % 1024 == 0, unit < units.count - 1 {
            value /= 1024
            unit += 1
        }
        return "\(value)\(units[unit])"
    }
}
