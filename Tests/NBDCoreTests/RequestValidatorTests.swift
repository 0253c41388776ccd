import Testing

@_spi(NBDMachines) @testable import NBDCore

@Suite("Strict mode: checks before the wire")
struct RequestValidatorTests {
    func validator(
        _ flags: TransmissionFlags,
        sizes: BlockSizeConstraints? = nil,
        structured: Bool = true,
        contexts: Bool = true
    ) -> RequestValidator {
        RequestValidator(
            export: NBDExportInfo(name: "", size: 1 << 20, flags: flags.union(.hasFlags), advertisedBlockSizes: sizes),
            format: structured ? .structured : .simple,
            hasMetaContexts: contexts
        )
    }

    func code(_ body: () throws -> Void) -> NBDError.Code? {
        do {
            try body()
            return nil
        } catch { return (error as? NBDError)?.code }
    }

    @Test func commandsNeedTheirFlag() {
        let bare = validator([])
        #expect(code { try bare.validate(.flush, flags: [], offset: 0, length: 0) } == .notAdvertised)
        #expect(code { try bare.validate(.trim, flags: [], offset: 0, length: 512) } == .notAdvertised)
        #expect(code { try bare.validate(.cache, flags: [], offset: 0, length: 512) } == .notAdvertised)
        #expect(code { try bare.validate(.writeZeroes, flags: [], offset: 0, length: 512) } == .notAdvertised)
        #expect(code { try bare.validate(.write, flags: .fua, offset: 0, length: 512) } == .notAdvertised)
        #expect(code { try bare.validate(.read, flags: .dontFragment, offset: 0, length: 512) } == .notAdvertised)
        let full = validator([.sendFlush, .sendTrim, .sendCache, .sendWriteZeroes, .sendFUA, .sendDF, .sendFastZero])
        #expect(code { try full.validate(.flush, flags: [], offset: 0, length: 0) } == nil)
        #expect(code { try full.validate(.trim, flags: .fua, offset: 0, length: 512) } == nil)
        #expect(code { try full.validate(.writeZeroes, flags: [.noHole, .fastZero, .fua], offset: 0, length: 512) } == nil)
        #expect(code { try full.validate(.read, flags: .dontFragment, offset: 0, length: 512) } == nil)
    }

    @Test func fastZeroNeedsItsOwnFlag() {
        let zeroes = validator([.sendWriteZeroes])
        #expect(code { try zeroes.validate(.writeZeroes, flags: .fastZero, offset: 0, length: 512) } == .notAdvertised)
    }

    @Test func readOnlyRefusesEveryWrite() {
        let readOnly = validator([.readOnly, .sendTrim, .sendWriteZeroes])
        for command in [CommandType.write, .trim, .writeZeroes] {
            #expect(code { try readOnly.validate(command, flags: [], offset: 0, length: 512) } == .notAdvertised)
        }
        #expect(code { try readOnly.validate(.read, flags: [], offset: 0, length: 512) } == nil)
    }

    @Test func flagsInvalidForTheCommand() {
        let full = validator([.sendFUA, .sendWriteZeroes, .sendDF])
        #expect(code { try full.validate(.read, flags: .noHole, offset: 0, length: 512) } == .invalidArgument)
        #expect(code { try full.validate(.write, flags: .requestOne, offset: 0, length: 512) } == .invalidArgument)
        #expect(code { try full.validate(.blockStatus, flags: .fua, offset: 0, length: 512) } == .invalidArgument)
    }

    @Test func rangesAndLengths() {
        let plain = validator([])
        #expect(code { try plain.validate(.read, flags: [], offset: 0, length: 0) } == .invalidArgument)
        #expect(code { try plain.validate(.read, flags: [], offset: (1 << 20) - 1, length: 2) } == .invalidArgument)
        #expect(code { try plain.validate(.read, flags: [], offset: UInt64.max, length: 2) } == .invalidArgument)
        #expect(code { try plain.validate(.read, flags: [], offset: (1 << 20) - 1, length: 1) } == nil)
    }

    @Test func alignmentToTheMinimumBlockSize() {
        let aligned = validator([], sizes: BlockSizeConstraints(minimum: 4096, preferred: 4096, maximum: 1 << 20))
        #expect(code { try aligned.validate(.read, flags: [], offset: 512, length: 4096) } == .invalidArgument)
        #expect(code { try aligned.validate(.read, flags: [], offset: 0, length: 1000) } == .invalidArgument)
        #expect(code { try aligned.validate(.read, flags: [], offset: 4096, length: 8192) } == nil)
    }

    @Test func blockStatusNeedsStructuredRepliesAndAContext() {
        #expect(code { try validator([], structured: false).validate(.blockStatus, flags: [], offset: 0, length: 512) } == .notAdvertised)
        #expect(code { try validator([], contexts: false).validate(.blockStatus, flags: [], offset: 0, length: 512) } == .notAdvertised)
        #expect(code { try validator([]).validate(.blockStatus, flags: .requestOne, offset: 0, length: 512) } == nil)
    }

    @Test func maximumPayloadDefaultsTo32MiB() {
        #expect(NBDExportInfo(name: "", size: 1, flags: []).maximumPayload == 32 << 20)
        let advertised = NBDExportInfo(
            name: "",
            size: 1,
            flags: [],
            advertisedBlockSizes: BlockSizeConstraints(minimum: 512, preferred: 4096, maximum: 1_000_000)
        )
        #expect(advertised.maximumPayload == 1_000_000 / 512 * 512)
    }

    @Test func advertisedSizesAreChecked() {
        #expect(throws: NBDError.self) { try BlockSizeConstraints(minimum: 3, preferred: 4096, maximum: 1 << 20).validate() }
        #expect(throws: NBDError.self) { try BlockSizeConstraints(minimum: 1 << 17, preferred: 1 << 17, maximum: 1 << 20).validate() }
        #expect(throws: NBDError.self) { try BlockSizeConstraints(minimum: 512, preferred: 256, maximum: 1 << 20).validate() }
        #expect(throws: NBDError.self) { try BlockSizeConstraints(minimum: 512, preferred: 4096, maximum: 1024).validate() }
    }

    /// "Clients MUST NOT send a resize request unless the NBD_FLAG_SEND_RESIZE flag was set";
    /// and a size every offset and length can still be aligned to.
    @Test func resizeNeedsItsFlagAWritableExportAndAnAlignedSize() {
        #expect(code { try validator([]).validateResize(to: 2 << 20) } == .notAdvertised)
        #expect(code { try validator([.sendResize, .readOnly]).validateResize(to: 2 << 20) } == .notAdvertised)
        let resizable = validator([.sendResize], sizes: BlockSizeConstraints(minimum: 512, preferred: 4096, maximum: 1 << 20))
        #expect(code { try resizable.validateResize(to: 2 << 20) } == nil)
        #expect(code { try resizable.validateResize(to: 0) } == nil)
        #expect(code { try resizable.validateResize(to: (2 << 20) + 1) } == .invalidArgument)
        #expect(code { try resizable.validateResize(to: UInt64.max - 511) } == .invalidArgument)
    }
}
