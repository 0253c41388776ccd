import NIOCore
import Testing

@_spi(NBDMachines) @testable import NBDCore

/// What a request's flags mean, decided by the server's transmission machine rather than by
/// whoever calls the backend: FUA on trim and zero, FAST_ZERO, REQ_ONE, CACHE; and the flags
/// and block sizes an export advertises, decided in one place.
@Suite("Server request rules")
struct ServerRequestRulesTests {
    func machine(zeroIsFast: Bool = false, resizable: Bool = false) -> ServerTransmissionStateMachine {
        let export = ServerNegotiationStateMachine.Export(
            serving: "disk",
            size: 1 << 20,
            isReadOnly: false,
            flushCoversAllConnections: true,
            zeroIsFast: zeroIsFast,
            resizableUpTo: resizable ? 8 << 20 : nil,
            maximumPayload: 65536
        )
        let agreement = ServerNegotiationStateMachine.Agreement(
            export: export,
            flags: export.flags.union(.sendDF),
            format: .structured,
            metaContexts: [NBDMetaContext(id: 1, name: "base:allocation")]
        )
        return ServerTransmissionStateMachine(agreement: agreement, limits: .init(maximumPayload: 65536, maximumRequestsInFlight: 8))
    }

    func send(
        _ machine: inout ServerTransmissionStateMachine,
        _ type: CommandType,
        flags: CommandFlags = [],
        offset: UInt64 = 0,
        length: UInt64 = 4096
    ) {
        var buffer = ByteBuffer()
        RequestHeader(flags: flags, type: type, cookie: 7, offset: offset, length: length).encode(into: &buffer)
        machine.bytesReceived(buffer)
    }

    /// The error value of a structured error reply, or nil.
    func errorValue(_ action: ServerTransmissionStateMachine.Action?) -> NBDErrno? {
        guard case .write(let buffers)? = action else { return nil }
        var bytes = buffers.gathered(capacity: buffers.reduce(0) { $0 + $1.readableBytes })
        guard case .structured(let header)? = try? ReplyHeader.decode(from: &bytes, format: .structured), header.type == .error
        else { return nil }
        return bytes.readInteger(as: UInt32.self).map { NBDErrno(rawValue: $0) }
    }

    /// Each command is performed as itself; one with no backend call (CACHE, DISC, a command
    /// code nobody knows, with a flag) is never performed as a FLUSH.
    @Test func everyCommandIsPerformedAsItselfAndNoOtherAsAFlush() {
        let machine = machine(resizable: true)
        let expected: [(CommandType, String?)] = [
            (.read, "read"), (.write, "write"), (.flush, "flush"), (.trim, "trim"), (.writeZeroes, "zero"),
            (.blockStatus, "blockStatus"), (.resize, "resize"), (.cache, nil), (.disconnect, nil),
            (CommandType(rawValue: 9), nil), (CommandType(rawValue: 0xffff), nil),
        ]
        for (type, name) in expected {
            let request = RequestHeader(flags: .fua, type: type, cookie: 1, offset: 0, length: 4096)
            let operation = machine.operation(for: request, data: [])
            let performed = operation.map { "\($0)".prefix { $0 != "(" } }.map(String.init)
            #expect(performed == name, "\(type)")
        }
    }

    @Test func fuaOnTrimAndZeroMeansAFlushAfterTheCall() {
        var machine = machine()
        for (type, fua) in [(CommandType.trim, true), (.trim, false), (.writeZeroes, true), (.writeZeroes, false)] {
            send(&machine, type, flags: fua ? .fua : [])
            switch machine.next() {
            case .perform(let request, .trim(_, _, let flush))?, .perform(let request, .zero(_, _, _, let flush))?:
                #expect(flush == fua, "\(type) FUA \(fua)")
                machine.requestCompleted(request, .done)
                _ = machine.next()
            default:
                Issue.record("\(type) was not performed as itself")
            }
        }
    }

    /// "the server MUST fail quickly with NBD_ENOTSUP unless the request can be serviced in
    /// less time than a corresponding NBD_CMD_WRITE": the backend is not even called.
    @Test func fastZeroIsRefusedWhereZeroingIsSlow() {
        var slow = machine(zeroIsFast: false)
        send(&slow, .writeZeroes, flags: .fastZero)
        #expect(errorValue(slow.next()) == .ENOTSUP)
        var fast = machine(zeroIsFast: true)
        send(&fast, .writeZeroes, flags: [.fastZero, .noHole])
        guard case .perform(_, .zero(_, _, let noHole, _))? = fast.next() else {
            Issue.record("a fast zero was not performed")
            return
        }
        #expect(noHole)
    }

    /// NBD_CMD_FLAG_REQ_ONE: one extent, no longer than the request, whatever the backend gave.
    @Test func requestOneAnswersOneExtentWithinTheRequest() throws {
        var machine = machine()
        send(&machine, .blockStatus, flags: .requestOne, length: 1000)
        guard case .perform(let request, .blockStatus(let offset, let length))? = machine.next() else {
            Issue.record("block status was not performed")
            return
        }
        #expect(offset == 0 && length == 1000)
        machine.requestCompleted(request, .extents([BlockDescriptor(length: 65536, flags: 3), BlockDescriptor(length: 4096, flags: 0)]))
        guard case .write(let buffers)? = machine.next() else {
            Issue.record("no reply")
            return
        }
        var bytes = buffers.gathered(capacity: buffers.reduce(0) { $0 + $1.readableBytes })
        guard case .structured(let header)? = try ReplyHeader.decode(from: &bytes, format: .structured) else {
            Issue.record("not a structured reply")
            return
        }
        // A context id, then one descriptor of 8 bytes.
        #expect(header.type == .blockStatus && header.length == 4 + 8)
        #expect(bytes.getInteger(at: bytes.readerIndex + 4, as: UInt32.self) == 1000)
    }

    @Test func cacheIsAnsweredWithoutTheBackend() {
        var machine = machine()
        send(&machine, .cache)
        guard case .write? = machine.next() else {
            Issue.record("CACHE was handed to the backend, or not answered")
            return
        }
        #expect(machine.inFlightCount == 0)
    }

    @Test func anExportsFlagsAndBlockSizesAreDecidedInOnePlace() {
        let writable = ServerNegotiationStateMachine.Export(
            serving: "w",
            size: 1,
            isReadOnly: false,
            flushCoversAllConnections: true,
            zeroIsFast: false,
            maximumPayload: 1 << 20
        )
        #expect(writable.flags == [.hasFlags, .sendFlush, .sendFUA, .sendCache, .sendTrim, .sendWriteZeroes, .sendFastZero, .canMultiConn])
        #expect(writable.blockSizes == BlockSizeConstraints(minimum: 1, preferred: 4096, maximum: 1 << 20))
        let readOnly = ServerNegotiationStateMachine.Export(
            serving: "r",
            size: 1,
            isReadOnly: true,
            flushCoversAllConnections: false,
            zeroIsFast: true,
            maximumPayload: 65536
        )
        #expect(readOnly.flags == [.hasFlags, .sendFlush, .sendFUA, .sendCache, .readOnly])
        #expect(readOnly.zeroIsFast)
    }

    /// RESIZE only where it is advertised, to a size an offset can hold; once done the new size
    /// bounds the connection, and a resizable export answers past its end with ENOSPC ("requests
    /// beyond the new size but not beyond the old one MUST fail with ENOSPC").
    @Test func resizeIsCheckedPerformedAndMovesTheEnd() {
        var fixed = machine()
        #expect(!fixed.agreement.flags.contains(.sendResize))
        send(&fixed, .resize, offset: 2 << 20, length: 0)
        #expect(errorValue(fixed.next()) == .EPERM)

        var resizable = machine(resizable: true)
        #expect(resizable.agreement.flags.contains(.sendResize))
        send(&resizable, .resize, offset: UInt64(Int64.max) + 1, length: 0)
        #expect(errorValue(resizable.next()) == .EINVAL)
        send(&resizable, .read, offset: 1 << 20, length: 512)
        #expect(errorValue(resizable.next()) == .ENOSPC)
        send(&resizable, .resize, flags: .fua, offset: 2 << 20, length: 0)
        guard case .perform(let request, .resize(let size, let flush))? = resizable.next() else {
            Issue.record("the resize was not performed")
            return
        }
        #expect(size == 2 << 20 && flush)
        resizable.requestCompleted(request, .done)
        _ = resizable.next()
        #expect(resizable.exportSize == 2 << 20)
        // Past the export's maximum (8 MiB): ENOSPC, no backend call, the size as it was.
        send(&resizable, .resize, offset: (8 << 20) + 512, length: 0)
        #expect(errorValue(resizable.next()) == .ENOSPC)
        #expect(resizable.exportSize == 2 << 20)
        send(&resizable, .resize, offset: 8 << 20, length: 0)
        guard case .perform(let atMaximum, .resize(8 << 20, _))? = resizable.next() else {
            Issue.record("a resize to the maximum was not performed")
            return
        }
        resizable.requestCompleted(atMaximum, .done)
        _ = resizable.next()
        send(&resizable, .read, offset: 1 << 20, length: 512)
        guard case .perform(_, .read)? = resizable.next() else {
            Issue.record("a read within the new size was refused")
            return
        }
        // Another connection shrank it: the end follows.
        resizable.exportSizeChanged(to: 4096)
        send(&resizable, .writeZeroes, offset: 4096, length: 512)
        #expect(errorValue(resizable.next()) == .ENOSPC)
    }

    @Test func aReadOnlyExportIsNeverResizable() {
        let export = ServerNegotiationStateMachine.Export(
            serving: "ro",
            size: 1 << 20,
            isReadOnly: true,
            flushCoversAllConnections: true,
            zeroIsFast: false,
            resizableUpTo: 2 << 20,
            maximumPayload: 65536
        )
        #expect(!export.flags.contains(.sendResize))
    }
}
