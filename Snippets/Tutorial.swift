// docs/Library.md's tutorial, phase by phase, as one function: built with the package so that it
// cannot rot. Run it against any writable export on /tmp/nbd.sock (`nbd serve` makes one).
// snippet.dial
import NBD
import NIOCore

func tutorial(data: [UInt8]) async throws {
    let connection = try await NBDConnection.connect(to: .unix(path: "/tmp/nbd.sock"))
    // or .tcp(host: "::1", port: 10809), or .abstractUnix(name: "nbd") on Linux
    print(connection.serverFlags)  // NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES
    // snippet.end

    // snippet.negotiate
    for export in try await connection.list() {  // NBD_OPT_LIST
        print(export.name, export.description)
    }
    let info = try await connection.info("disk")  // NBD_OPT_INFO
    print(info.size, info.blockSizes, info.canTrim)  // 1073741824 minimum 1, preferred 4096, maximum 33554432 true
    let format = try await connection.negotiateFormat()  // NBD_OPT_EXTENDED_HEADERS, else NBD_OPT_STRUCTURED_REPLY
    print(format)  // extended (structured or simple from older servers)
    let all = try await connection.listMetaContexts(for: "disk")  // NBD_OPT_LIST_META_CONTEXT
    print(all)  // [base:allocation]
    try await connection.setMetaContexts(for: "disk", queries: ["base:allocation"])  // NBD_OPT_SET_META_CONTEXT
    // snippet.end

    // snippet.go
    let export = try await connection.go("disk")  // NBD_OPT_GO; EXPORT_NAME if the server lacks GO
    // snippet.end

    // snippet.transmit
    try await export.write(ByteBuffer(bytes: data), at: 0)  // NBD_CMD_WRITE
    let bytes = try await export.read(at: 0, length: 4096)  // NBD_CMD_READ
    var reused = ByteBuffer()
    try await export.read(into: &reused, at: 4096, length: 4096)  // into your buffer, in place
    try await export.writeZeroes(at: 0, length: 1 << 20, flags: .noHole)
    try await export.trim(at: 1 << 20, length: 1 << 20)
    try await export.cache(at: 0, length: 1 << 20)
    try await export.flush()
    let status = try await export.blockStatus(at: 0, length: export.size)  // one request
    for try await extent in export.extents(of: .baseAllocation) {  // the whole export
        print(extent)  // 0..<1048576: data, then 1048576..<1073741824: hole, zero
    }
    // snippet.end
    _ = (bytes, status)

    // snippet.disconnect
    await export.disconnect()  // requests in flight finish, then NBD_CMD_DISC, then close
}
// snippet.end

// snippet.hide
// `swift run Tutorial run`, with `nbd serve --memory 1G --name disk --socket /tmp/nbd.sock` running.
if CommandLine.arguments.dropFirst().first == "run" {
    try await tutorial(data: Array(repeating: 0x5A, count: 8192))
}
