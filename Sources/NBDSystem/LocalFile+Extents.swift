#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

extension LocalFile {
    /// A stretch of a file: data, or a hole that reads as zeroes and takes no space.
    package struct Extent: Sendable, Equatable {
        package var range: Range<UInt64>
        package var isHole: Bool

        package init(_ range: Range<UInt64>, isHole: Bool) {
            self.range = range
            self.isHole = isHole
        }
    }

    /// The data and holes of `range` (clipped to `size`), in order, from `SEEK_DATA` and
    /// `SEEK_HOLE`, in at most `limit` extents (the rest is asked for again from where the
    /// answer ends). A file system that cannot tell, a block device and a stream are all data:
    /// nothing is ever called a hole that was not found to be one.
    package func extents(in range: Range<UInt64>, size: UInt64, limit: Int) async throws -> [Extent] {
        let end = min(size, range.upperBound)
        guard range.lowerBound < end else { return [] }
        guard kind == .regular else { return [Extent(range.lowerBound..<end, isHole: false)] }
        let fd = descriptor
        return try await blocking {
            #if os(Linux)
            // Linux's values, which Glibc does not export to Swift.
            let seekData: Int32 = 3
            let seekHole: Int32 = 4
            #else
            let seekData = SEEK_DATA
            let seekHole = SEEK_HOLE
            #endif
            var result: [Extent] = []
            var position = range.lowerBound
            while position < end, result.count < limit {
                guard let from = off_t(exactly: position) else { throw FileIOError(code: EOVERFLOW) }
                let data = lseek(fd, from, seekData)
                let dataStart: UInt64
                if data >= 0 {
                    dataStart = min(end, UInt64(data))
                } else if errno == ENXIO {
                    // "ENXIO: there is no more data past offset": the rest is a hole.
                    dataStart = end
                } else {
                    // No SEEK_DATA here (EINVAL): call the rest data, never a hole.
                    result.append(Extent(position..<end, isHole: false))
                    break
                }
                if dataStart > position {
                    result.append(Extent(position..<dataStart, isHole: true))
                    position = dataStart
                    continue
                }
                let hole = lseek(fd, from, seekHole)
                // A hole is always found, if only the one at the end of the file.
                let holeStart = hole < 0 ? end : min(end, UInt64(hole))
                let dataEnd = max(holeStart, position + 1)
                result.append(Extent(position..<dataEnd, isHole: false))
                position = dataEnd
            }
            return result
        }
    }
}
