import NBD
import Testing

@Suite("How extents print")
struct ExtentDescriptionTests {
    @Test func extentsSayWhatTheirFlagsMean() {
        #expect("\(NBDExtent(offset: 0, length: 65536, flags: 3, context: "base:allocation"))" == "0..<65536: hole, zero")
        #expect("\(NBDExtent(offset: 4096, length: 4096, flags: 0, context: "base:allocation"))" == "4096..<8192: data")
        #expect("\(NBDExtent(offset: 0, length: 1, flags: 1, context: "qemu:dirty-bitmap:b0").status)" == "dirty")
        #expect("\(NBDExtent(offset: 0, length: 1, flags: 2, context: "qemu:allocation-depth").status)" == "depth 2")
        #expect("\(NBDExtent(offset: 0, length: 1, flags: 0x10, context: "x:y").status)" == "flags 0x10")
    }
}
