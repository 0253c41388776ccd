import NIOCore
import Testing

@_spi(NBDMachines) @testable import NBDCore

@Suite("Transmission state machine")
struct ClientTransmissionStateMachineTests {
    typealias Machine = ClientTransmissionStateMachine<String>

    /// What the machine did, flattened for comparison.
    enum Event: Hashable {
        case data(String, UInt64, [UInt8])
        case hole(String, UInt64, UInt32)
        case status(String, UInt32, [BlockDescriptor])
        case complete(String, NBDErrno?)
        case fatal([String])
    }

    func drain(_ machine: inout Machine) -> [Event] {
        var events: [Event] = []
        while let action = machine.next() {
            switch action {
            case .data(let c, let offset, let bytes): events.append(.data(c, offset, Array(bytes.readableBytesView)))
            case .hole(let c, let offset, let length): events.append(.hole(c, offset, length))
            case .blockStatus(let c, let id, let d): events.append(.status(c, id, d))
            case .complete(let c, let error): events.append(.complete(c, error?.serverErrno))
            case .fatal(_, let contexts): events.append(.fatal(contexts.sorted()))
            }
        }
        return events
    }

    func chunk(_ cookie: NBDCookie, _ type: ReplyChunkType, done: Bool = true, _ payload: [UInt8]) -> [UInt8] {
        encoded {
            ReplyHeader.structured(
                StructuredReplyHeader(flags: done ? .done : [], type: type, cookie: cookie, length: UInt32(payload.count))
            ).encode(into: &$0)
            $0.writeBytes(payload)
        }
    }

    func data(_ cookie: NBDCookie, offset: UInt64, _ bytes: [UInt8], done: Bool = true) -> [UInt8] {
        chunk(cookie, .offsetData, done: done, encoded { $0.writeInteger(offset) } + bytes)
    }

    func simple(_ cookie: NBDCookie, error: UInt32 = 0) -> [UInt8] {
        encoded { ReplyHeader.simple(SimpleReplyHeader(error: NBDErrno(rawValue: error), cookie: cookie)).encode(into: &$0) }
    }

    func feed(_ machine: inout Machine, _ bytes: [UInt8]) { machine.feed(ByteBuffer(bytes: bytes)) }

    @Test func cookiesAreUniqueAndCountUp() {
        var machine = Machine(configuration: .init(format: .structured))
        let cookies = (0..<3).map { machine.startRequest(.read, offset: 0, length: 1, context: "\($0)").cookie }
        #expect(cookies == [1, 2, 3])
        #expect(machine.inFlightCount == 3)
    }

    @Test func simpleReadDataIsStreamedAsItArrives() {
        var machine = Machine(configuration: .init(format: .simple))
        _ = machine.startRequest(.read, offset: 100, length: 6, context: "r")
        feed(&machine, simple(1) + [1, 2])
        #expect(drain(&machine) == [.data("r", 100, [1, 2])])
        feed(&machine, [3, 4, 5])
        #expect(drain(&machine) == [.data("r", 102, [3, 4, 5])])
        feed(&machine, [6])
        #expect(drain(&machine) == [.data("r", 105, [6]), .complete("r", nil)])
    }

    @Test func repliesAreMatchedOutOfOrder() {
        var machine = Machine(configuration: .init(format: .structured))
        _ = machine.startRequest(.read, offset: 0, length: 2, context: "first")
        _ = machine.startRequest(.write, offset: 0, length: 2, context: "second")
        _ = machine.startRequest(.read, offset: 10, length: 2, context: "third")
        feed(&machine, data(3, offset: 10, [9, 9]) + simple(2) + data(1, offset: 0, [7, 7]))
        #expect(
            drain(&machine) == [
                .data("third", 10, [9, 9]), .complete("third", nil),
                .complete("second", nil),
                .data("first", 0, [7, 7]), .complete("first", nil),
            ]
        )
        #expect(machine.inFlightCount == 0)
    }

    @Test func structuredReadInChunksHolesAndAnyOrder() {
        var machine = Machine(configuration: .init(format: .structured))
        _ = machine.startRequest(.read, offset: 0, length: 8, context: "r")
        let hole = chunk(1, .offsetHole, done: false, encoded { $0.writeMultipleIntegers(UInt64(0), UInt32(4)) })
        feed(&machine, data(1, offset: 4, [1, 2, 3, 4], done: false) + hole + chunk(1, .none, []))
        #expect(drain(&machine) == [.data("r", 4, [1, 2, 3, 4]), .hole("r", 0, 4), .complete("r", nil)])
    }

    @Test func byteAtATimeGivesTheSameResult() {
        var machine = Machine(configuration: .init(format: .structured))
        _ = machine.startRequest(.read, offset: 0, length: 4, context: "r")
        var events: [Event] = []
        for byte in data(1, offset: 0, [1, 2, 3, 4]) {
            feed(&machine, [byte])
            events += drain(&machine)
        }
        #expect(events == [.data("r", 0, [1]), .data("r", 1, [2]), .data("r", 2, [3]), .data("r", 3, [4]), .complete("r", nil)])
    }

    @Test func unknownCookieFailsEverything() {
        var machine = Machine(configuration: .init(format: .structured))
        _ = machine.startRequest(.read, offset: 0, length: 4, context: "a")
        _ = machine.startRequest(.flush, offset: 0, length: 0, context: "b")
        feed(&machine, simple(99))
        #expect(drain(&machine) == [.fatal(["a", "b"])])
        #expect(machine.hasFailed)
        feed(&machine, simple(2))
        #expect(drain(&machine).isEmpty)
    }

    @Test func overlappingChunksAreAViolation() {
        var machine = Machine(configuration: .init(format: .structured))
        _ = machine.startRequest(.read, offset: 0, length: 8, context: "r")
        feed(&machine, data(1, offset: 0, [1, 2, 3, 4], done: false) + data(1, offset: 2, [5, 6, 7, 8, 9, 9]))
        #expect(drain(&machine).last == .fatal(["r"]))
    }

    @Test func chunkOutsideTheRequestIsAViolation() {
        var machine = Machine(configuration: .init(format: .structured))
        _ = machine.startRequest(.read, offset: 100, length: 8, context: "r")
        feed(&machine, data(1, offset: 104, [1, 2, 3, 4, 5, 6, 7, 8]))
        #expect(drain(&machine) == [.fatal(["r"])])
    }

    @Test func readThatIsNotFullyCoveredIsAViolation() {
        var machine = Machine(configuration: .init(format: .structured))
        _ = machine.startRequest(.read, offset: 0, length: 8, context: "r")
        feed(&machine, data(1, offset: 0, [1, 2, 3, 4]))
        #expect(drain(&machine).last == .fatal(["r"]))
    }

    @Test func errorChunkFailsOnlyItsRequest() {
        var machine = Machine(configuration: .init(format: .structured))
        _ = machine.startRequest(.read, offset: 0, length: 8, context: "r")
        _ = machine.startRequest(.flush, offset: 0, length: 0, context: "f")
        let error = chunk(
            1,
            .errorOffset,
            encoded {
                $0.writeMultipleIntegers(UInt32(5), UInt16(2))
                $0.writeString("io")
                $0.writeInteger(UInt64(4))
            }
        )
        feed(&machine, error + simple(2))
        #expect(drain(&machine) == [.complete("r", .EIO), .complete("f", nil)])
        #expect(!machine.hasFailed)
    }

    @Test func simpleErrorReplyFailsTheCommand() {
        var machine = Machine(configuration: .init(format: .simple))
        _ = machine.startRequest(.write, offset: 0, length: 8, context: "w")
        feed(&machine, simple(1, error: 28))
        #expect(drain(&machine) == [.complete("w", .ENOSPC)])
    }

    @Test func successfulSimpleReplyToAStructuredReadIsAViolation() {
        var machine = Machine(configuration: .init(format: .structured))
        _ = machine.startRequest(.read, offset: 0, length: 8, context: "r")
        feed(&machine, simple(1))
        #expect(drain(&machine) == [.fatal(["r"])])
    }

    @Test func structuredChunkWithoutNegotiationIsAViolation() {
        var machine = Machine(configuration: .init(format: .simple))
        _ = machine.startRequest(.flush, offset: 0, length: 0, context: "f")
        feed(&machine, chunk(1, .none, []))
        #expect(drain(&machine) == [.fatal(["f"])])
    }

    @Test func blockStatusIsRoutedByContextID() {
        var machine = Machine(configuration: .init(format: .structured, metaContextIDs: [1, 2]))
        _ = machine.startRequest(.blockStatus, offset: 0, length: 8192, context: "b")
        let first = chunk(1, .blockStatus, done: false, encoded { $0.writeMultipleIntegers(UInt32(2), UInt32(8192), UInt32(1)) })
        let second = chunk(
            1,
            .blockStatus,
            encoded { $0.writeMultipleIntegers(UInt32(1), UInt32(4096), UInt32(3), UInt32(4096), UInt32(0)) }
        )
        feed(&machine, first + second)
        #expect(
            drain(&machine) == [
                .status("b", 2, [BlockDescriptor(length: 8192, flags: 1)]),
                .status("b", 1, [BlockDescriptor(length: 4096, flags: 3), BlockDescriptor(length: 4096, flags: 0)]),
                .complete("b", nil),
            ]
        )
    }

    @Test func blockStatusForAnUnknownContextIsAViolation() {
        var machine = Machine(configuration: .init(format: .structured, metaContextIDs: [1]))
        _ = machine.startRequest(.blockStatus, offset: 0, length: 4096, context: "b")
        feed(&machine, chunk(1, .blockStatus, encoded { $0.writeMultipleIntegers(UInt32(7), UInt32(4096), UInt32(0)) }))
        #expect(drain(&machine) == [.fatal(["b"])])
    }

    @Test func blockStatusMissingAContextIsAViolation() {
        var machine = Machine(configuration: .init(format: .structured, metaContextIDs: [1, 2]))
        _ = machine.startRequest(.blockStatus, offset: 0, length: 4096, context: "b")
        feed(&machine, chunk(1, .blockStatus, encoded { $0.writeMultipleIntegers(UInt32(1), UInt32(4096), UInt32(0)) }))
        #expect(drain(&machine).last == .fatal(["b"]))
    }

    @Test func requestOneAllowsExactlyOneExtent() {
        var machine = Machine(configuration: .init(format: .structured, metaContextIDs: [1]))
        _ = machine.startRequest(.blockStatus, flags: .requestOne, offset: 0, length: 4096, context: "b")
        feed(
            &machine,
            chunk(1, .blockStatus, encoded { $0.writeMultipleIntegers(UInt32(1), UInt32(512), UInt32(0), UInt32(512), UInt32(1)) })
        )
        #expect(drain(&machine) == [.fatal(["b"])])
    }

    @Test func oversizedChunkIsRefusedFromItsHeaderAlone() {
        var machine = Machine(configuration: .init(format: .structured, metaContextIDs: [1]))
        _ = machine.startRequest(.blockStatus, offset: 0, length: 4096, context: "b")
        // Only the 20-byte header of a 2 GiB block status chunk: no waiting for 2 GiB.
        feed(
            &machine,
            encoded {
                ReplyHeader.structured(StructuredReplyHeader(flags: .done, type: .blockStatus, cookie: 1, length: 1 << 31)).encode(
                    into: &$0
                )
            }
        )
        #expect(drain(&machine) == [.fatal(["b"])])
    }

    @Test func dataChunkLargerThanTheRequestIsRefusedFromItsHeader() {
        var machine = Machine(configuration: .init(format: .structured))
        _ = machine.startRequest(.read, offset: 0, length: 512, context: "r")
        feed(
            &machine,
            encoded {
                ReplyHeader.structured(StructuredReplyHeader(flags: .done, type: .offsetData, cookie: 1, length: 0xFFFF_FFF0)).encode(
                    into: &$0
                )
                $0.writeInteger(UInt64(0))
            }
        )
        #expect(drain(&machine) == [.fatal(["r"])])
    }

    @Test func connectionClosedMidReplyFailsEveryRequest() {
        var machine = Machine(configuration: .init(format: .structured))
        _ = machine.startRequest(.read, offset: 0, length: 8, context: "r")
        _ = machine.startRequest(.write, offset: 0, length: 8, context: "w")
        feed(&machine, data(1, offset: 0, [1, 2, 3], done: true).dropLast(2))
        _ = drain(&machine)
        guard case .fatal(let error, let contexts)? = machine.connectionClosed(NBDError(.connectionClosed, "gone", connectionUsable: false))
        else {
            Issue.record("no fatal action")
            return
        }
        #expect(contexts.sorted() == ["r", "w"])
        #expect(error.code == .connectionClosed)
    }

    @Test func noneWithoutDoneIsAViolation() {
        var machine = Machine(configuration: .init(format: .structured))
        _ = machine.startRequest(.flush, offset: 0, length: 0, context: "f")
        feed(&machine, chunk(1, .none, done: false, []))
        #expect(drain(&machine) == [.fatal(["f"])])
    }

    @Test func dontFragmentAllowsOneContentChunk() {
        var machine = Machine(configuration: .init(format: .structured))
        _ = machine.startRequest(.read, flags: .dontFragment, offset: 0, length: 4, context: "r")
        feed(&machine, data(1, offset: 0, [1, 2], done: false) + data(1, offset: 2, [3, 4]))
        #expect(drain(&machine).last == .fatal(["r"]))
    }
}

extension ClientTransmissionStateMachineTests {
    /// Every chunk type, fed one byte at a time, gives what it gives all at once.
    @Test func everyChunkTypeDrippedGivesTheSameEvents() {
        let hole = chunk(1, .offsetHole, done: false, encoded { $0.writeMultipleIntegers(UInt64(0), UInt32(4)) })
        let error = chunk(
            1,
            .errorOffset,
            done: false,
            encoded {
                $0.writeMultipleIntegers(UInt32(5), UInt16(1))
                $0.writeString("e")
                $0.writeInteger(UInt64(6))
            }
        )
        let status = chunk(2, .blockStatus, done: true, encoded { $0.writeMultipleIntegers(UInt32(1), UInt32(512), UInt32(3)) })
        let stream = hole + data(1, offset: 4, [1, 2, 3, 4], done: false) + error + status + chunk(1, .none, []) + simple(3)
        func run(_ pieces: [[UInt8]]) -> [Event] {
            var machine = Machine(configuration: .init(format: .structured, metaContextIDs: [1]))
            _ = machine.startRequest(.read, offset: 0, length: 8, context: "r")
            _ = machine.startRequest(.blockStatus, offset: 0, length: 512, context: "b")
            _ = machine.startRequest(.flush, offset: 0, length: 0, context: "f")
            var events: [Event] = []
            for piece in pieces {
                feed(&machine, piece)
                events += drain(&machine)
            }
            return events
        }
        let whole = run([stream])
        #expect(
            whole == [
                .hole("r", 0, 4), .data("r", 4, [1, 2, 3, 4]), .status("b", 1, [BlockDescriptor(length: 512, flags: 3)]),
                .complete("b", nil), .complete("r", .EIO), .complete("f", nil),
            ]
        )
        // Data comes in smaller slices when dripped; everything else is identical.
        var merged: [Event] = []
        for event in run(stream.map { [$0] }) {
            if case .data(let c, _, let bytes) = event, case .data(c, let start, let earlier)? = merged.last {
                merged[merged.count - 1] = .data(c, start, earlier + bytes)
            } else {
                merged.append(event)
            }
        }
        #expect(merged == whole)
    }

    // MARK: Data read by the caller straight from the socket

    @Test func expectedDataTellsWhereTheNextBytesGoOnlyWhenNoneAreBuffered() {
        var machine = Machine(configuration: .init(format: .structured))
        _ = machine.startRequest(.read, offset: 1000, length: 10, context: "r")
        #expect(machine.expectedData == nil)  // a header comes first
        // The header, the offset and 2 of 6 data bytes.
        let reply = data(1, offset: 1004, [1, 2, 3, 4, 5, 6], done: false)
        feed(&machine, Array(reply.prefix(reply.count - 4)))
        #expect(drain(&machine) == [.data("r", 1004, [1, 2])])
        let expected = machine.expectedData
        #expect(expected?.context == "r" && expected?.offset == 1006 && expected?.count == 4)
        // Read directly in two goes; the reply completes through next().
        machine.dataReadDirectly(3)
        #expect(drain(&machine) == [])
        #expect(machine.expectedData?.offset == 1009 && machine.expectedData?.count == 1)
        // Fed bytes take precedence: nothing is expected while some are buffered.
        feed(&machine, [6])
        #expect(machine.expectedData == nil)
        #expect(drain(&machine) == [.data("r", 1009, [6])])
        #expect(machine.inFlightCount == 1)  // more chunks to come
        #expect(machine.expectedData == nil)
    }

    @Test func directlyReadDataCompletesAndChecksTheReply() {
        var machine = Machine(configuration: .init(format: .simple))
        _ = machine.startRequest(.read, offset: 0, length: 8, context: "whole")
        _ = machine.startRequest(.flush, offset: 0, length: 0, context: "flush")
        feed(&machine, simple(1))
        #expect(drain(&machine) == [])
        #expect(machine.expectedData?.count == 8)
        machine.dataReadDirectly(8)
        // Then the next reply is parsed from fed bytes as usual.
        feed(&machine, simple(2))
        #expect(drain(&machine) == [.complete("whole", nil), .complete("flush", nil)])

        // A structured read whose directly read chunk leaves the request uncovered is a violation.
        var structured = Machine(configuration: .init(format: .structured))
        _ = structured.startRequest(.read, offset: 0, length: 16, context: "short")
        feed(&structured, Array(data(1, offset: 0, Array(repeating: 7, count: 8)).prefix(28)))
        #expect(drain(&structured) == [])
        structured.dataReadDirectly(8)
        #expect(drain(&structured) == [.fatal(["short"])])
        #expect(structured.hasFailed)
        #expect(structured.expectedData == nil)
    }

    @Test func unparsedBytesCanBeTakenAndFedAgainInFront() {
        var machine = Machine(configuration: .init(format: .simple))
        _ = machine.startRequest(.flush, offset: 0, length: 0, context: "f")
        _ = machine.startRequest(.read, offset: 0, length: 2, context: "r")
        let replies = simple(1) + simple(2) + [8, 9]
        // Half of the first header: nothing to do, 7 bytes kept.
        feed(&machine, Array(replies.prefix(7)))
        #expect(drain(&machine) == [])
        #expect(machine.unparsedByteCount == 7)
        var taken = machine.takeUnparsed()
        #expect(machine.unparsedByteCount == 0)
        // The caller's next read lands behind them, in one buffer.
        taken.writeBytes(replies.dropFirst(7))
        machine.feed(taken)
        #expect(drain(&machine) == [.complete("f", nil), .data("r", 0, [8, 9]), .complete("r", nil)])
    }
}
