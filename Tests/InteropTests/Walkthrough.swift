import Foundation
import NBD
import NIOCore
import Testing

/// The same walk through every phase against any writable server: handshake, LIST, INFO,
/// structured replies, SET_META_CONTEXT, GO, write/read round trip checked by content,
/// FLUSH, WRITE_ZEROES, TRIM, BLOCK_STATUS equal to `nbdinfo --map --json`, DISC.
func walkthrough(
    _ server: ServerProcess,
    _ uri: NBDURI,
    listed: [String]? = nil,
    blockStatus: Bool = true,
    sizeInInfo: Bool = true,
    seed: UInt8 = 7
) async throws {
    let connection = try await NBDConnection.connect(to: uri.address)
    #expect(connection.serverFlags.contains(.fixedNewstyle))
    if let listed {
        let names = try await connection.list().map(\.name)
        #expect(Set(listed).isSubset(of: Set(names)), "LIST gave \(names)")
    }
    let structured = try await connection.enableStructuredReplies()
    #expect(structured || !blockStatus)
    // After structured replies, since they change what may be advertised (NBD_FLAG_SEND_DF).
    let info = try await connection.info(uri.exportName)
    // nbd-server 3.24 opens the file only at GO, and reports size 0 to NBD_OPT_INFO.
    #expect(info.size > 2 << 20 || !sizeInInfo)
    var contexts: [NBDMetaContext] = []
    if blockStatus {
        contexts = try await connection.setMetaContexts(for: uri.exportName, queries: ["base:allocation"])
        #expect(contexts.map(\.name) == ["base:allocation"])
    }
    let export = try await connection.go(uri.exportName)
    #expect(export.size > 2 << 20)
    #expect(export.size == info.size || !sizeInInfo)
    #expect(export.info.flags == info.flags || !sizeInInfo)
    #expect(export.metaContexts == contexts)

    let data = pattern((1 << 20) + 4096, seed: seed)
    try await export.write(data, at: 8192)
    #expect(try await export.read(at: 8192, length: UInt64(data.readableBytes)) == data)
    if export.info.canFlush { try await export.flush() }

    if export.info.canZero {
        try await export.writeZeroes(at: 8192, length: 65536)
        let zeroed = try await export.read(at: 8192, length: 65536 + 4096)
        #expect(zeroed.readableBytesView.prefix(65536).allSatisfy { $0 == 0 })
        #expect(Array(zeroed.readableBytesView.suffix(4096)) == Array(data.readableBytesView[65536..<(65536 + 4096)]))
    }
    if export.info.canTrim {
        try await export.trim(at: 1 << 20, length: 65536)
    }
    if export.info.canFlush { try await export.flush() }

    if blockStatus {
        let ours = try await mapExport(export, context: "base:allocation")
        let theirs = try nbdinfoMap(server, uri)
        #expect(ours == theirs)
    } else {
        await #expect { _ = try await export.blockStatus(at: 0, length: 4096) } throws: { ($0 as? NBDError)?.code == .notAdvertised }
    }
    await export.disconnect()
}

/// 1,024 requests from 16 tasks at once on one connection: each task writes 32 blocks of its
/// own, then reads each back and compares every byte.
func thousandRequestsFromSixteenTasks(_ export: NBDExport) async throws {
    let block = 16384
    try await withThrowingTaskGroup(of: Void.self) { group in
        for task in 0..<16 {
            group.addTask {
                for round in 0..<32 {
                    let slot = task * 32 + round
                    try await export.write(pattern(block, seed: UInt8(truncatingIfNeeded: slot)), at: UInt64(slot * block))
                }
                for round in 0..<32 {
                    let slot = task * 32 + round
                    #expect(
                        try await export.read(at: UInt64(slot * block), length: UInt64(block))
                            == pattern(block, seed: UInt8(truncatingIfNeeded: slot))
                    )
                }
            }
        }
        try await group.waitForAll()
    }
}
