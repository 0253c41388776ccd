import Foundation
import NBD
import Testing

@Suite("nbd dump beside nbddump", .serialized)
struct DumpCommandTests {
    @Test func sameOutputAsNbddump() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let data = #"data="Hello, world!\n" @4096 1 2 3 "xyz" @0x2000 0x7f 0x80 @0x10000 0 0 1"#
        let uri = try await server.nbdkit(["data", data]).description
        let ours = try runNBD(["dump", uri])
        #expect(ours.status == 0)
        #expect(ours.output == String(decoding: try server.run("nbddump", [uri]), as: UTF8.self))
        #expect(ours.output.contains("0000000000: 48 65 6c 6c 6f 2c 20 77  6f 72 6c 64 21 0a 00 00 |Hello, world!...|"))
    }

    @Test func sparseExportSkipsItsZeroes() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        // 2 GiB mostly of holes: only the data is read.
        let uri = try await server.nbdkit(["sparse-random", "2G", "seed=5", "percent=0.01", "runlength=4096"]).description
        let ours = try runNBD(["dump", uri])
        #expect(ours.status == 0)
        #expect(ours.output == String(decoding: try server.run("nbddump", [uri]), as: UTF8.self))
    }

    @Test func aLengthPastTheEndOfEverythingStopsAtTheExportsEnd() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(["data", #"data=@4096 "ABCDEFGHIJKLMNOPQRSTUVWXYZ" @8192 0"#]).description
        // offset + length would pass 2^64: the dump ends where the export does, without a trap.
        let ours = try runNBD(["dump", "--offset", "8176", "--length", "\(UInt64.max)", uri])
        #expect(ours.status == 0, "\(ours.error)")
        #expect(
            ours.output == """
                0000001ff0: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|
                0000002000: 00                                               |.               |

                """
        )
    }

    @Test func offsetAndLength() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(["data", #"data=@4096 "ABCDEFGHIJKLMNOPQRSTUVWXYZ" @8192 0"#]).description
        let ours = try runNBD(["dump", "--offset", "4100", "--length", "20", uri])
        #expect(ours.status == 0)
        #expect(
            ours.output == """
                0000001004: 45 46 47 48 49 4a 4b 4c  4d 4e 4f 50 51 52 53 54 |EFGHIJKLMNOPQRST|
                0000001014: 55 56 57 58                                      |UVWX            |

                """
        )
        // Sizes take the same K, M, G, T suffixes as every other size option.
        let suffixed = try runNBD(["dump", "--offset", "4K", "--length", "1K", uri])
        #expect(suffixed.status == 0, "\(suffixed.error)")
        #expect(suffixed.output.hasPrefix("0000001000: 41 42 43 44 45 46 47 48"), "\(suffixed.output)")
        #expect(try runNBD(["dump", "--offset", "2X", uri]).error.contains("not a size: \"2X\""))
    }

    @Test func offsetPastTheEndIsOneLine() async throws {
        let server = try ServerProcess()
        defer { server.stop() }
        let uri = try await server.nbdkit(["memory", "1M"]).description
        let ours = try runNBD(["dump", "--offset", "99999999", uri])
        #expect(ours.status == 1)
        #expect(ours.error.hasPrefix("nbd: ") && ours.error.split(separator: "\n").count == 1)
    }
}
