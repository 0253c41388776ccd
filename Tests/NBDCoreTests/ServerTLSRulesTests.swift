import NIOCore
import Testing

@_spi(NBDMachines) @testable import NBDCore

/// The spec's rules for a TLS server, each held by the server's machines: what is answered
/// before TLS in each mode, STARTTLS itself, what is forgotten once TLS is up, bytes injected
/// behind STARTTLS, the handshake deadline and the allow-list.
@Suite("Server TLS rules")
struct ServerTLSRulesTests {
    static let export = ServerNegotiationStateMachine.Export(
        name: "disk",
        size: 1 << 20,
        flags: [.hasFlags, .sendFlush],
        blockSizes: BlockSizeConstraints(minimum: 1, preferred: 4096, maximum: 65536)
    )

    func negotiation(_ mode: NBDServerTLSMode) -> ServerNegotiationStateMachine {
        var machine = ServerNegotiationStateMachine(exports: [Self.export], tlsMode: mode)
        var flags = ByteBuffer(integer: ClientFlags([.fixedNewstyle, .noZeroes]).rawValue)
        _ = machine.receive(&flags)
        return machine
    }

    func bytes(_ requests: OptionRequest...) -> ByteBuffer {
        var buffer = ByteBuffer()
        for request in requests { request.encode(into: &buffer) }
        return buffer
    }

    func replies(_ bytes: ByteBuffer) -> [OptionReply.Body] {
        var bytes = bytes
        var replies: [OptionReply.Body] = []
        while let reply = try? OptionReply.decode(from: &bytes, maximumLength: 1 << 16) { replies.append(reply.body) }
        return replies
    }

    func answer(_ machine: inout ServerNegotiationStateMachine, _ request: OptionRequest) -> ServerNegotiationStateMachine.Action {
        var input = bytes(request)
        return machine.receive(&input)
    }

    /// FORCEDTLS: "If the server receives any other option, including NBD_OPT_INFO and
    /// unsupported options, it MUST reply with NBD_REP_ERR_TLS_REQD if TLS has not been
    /// initiated", and EXPORT_NAME "MUST terminate the session": no name or size in clear.
    @Test func underRequireOnlyStartTLSAndAbortAreAnsweredInClear() {
        let refused: [OptionRequest] = [
            .list, .info(export: "disk", requests: [.name]), .go(export: "disk", requests: []), .structuredReply, .extendedHeaders,
            .listMetaContext(export: "disk", queries: []), .other(OptionCode(rawValue: 99), ByteBuffer()),
        ]
        for request in refused {
            var machine = negotiation(.require)
            guard case .send(let out) = answer(&machine, request) else {
                Issue.record("\(request.code) was not answered")
                continue
            }
            let answers = replies(out)
            #expect(answers.count == 1 && answers.first?.isError == true, "\(request.code): \(answers)")
            if case .error(let type, _)? = answers.first { #expect(type == .errTLSRequired, "\(request.code)") }
        }
        var machine = negotiation(.require)
        guard case .close(let out) = answer(&machine, .exportName("disk")) else {
            Issue.record("EXPORT_NAME before TLS did not end the session")
            return
        }
        #expect(out.readableBytes == 0, "nothing, not even the size, is sent")
        var aborting = negotiation(.require)
        guard case .close(let ack) = answer(&aborting, .abort) else {
            Issue.record("ABORT was not answered")
            return
        }
        #expect(replies(ack) == [.ack])
    }

    @Test func startTLSIsAcknowledgedThenNothingIsReadUntilTheHandshake() {
        for mode in [NBDServerTLSMode.on, .require] {
            var machine = negotiation(mode)
            guard case .startTLS(let ack) = answer(&machine, .startTLS) else {
                Issue.record("\(mode): STARTTLS was not accepted")
                continue
            }
            #expect(replies(ack) == [.ack])
            // Until the handshake is reported, options are left where they are.
            var waiting = bytes(.list)
            guard case .wait = machine.receive(&waiting) else {
                Issue.record("\(mode): an option was read before the TLS handshake")
                continue
            }
            #expect(waiting.readableBytes > 0)
            machine.tlsEstablished()
            #expect(machine.isTLS)
            guard case .send(let list) = machine.receive(&waiting) else {
                Issue.record("\(mode): LIST over TLS was not answered")
                continue
            }
            #expect(replies(list).last == .ack && !replies(list).contains { $0.isError })
            // "If the server receives NBD_OPT_STARTTLS when TLS has already been negotiated, it
            // MUST reply with NBD_REP_ERR_INVALID."
            guard case .send(let again) = answer(&machine, .startTLS), case .error(let type, _)? = replies(again).first else {
                Issue.record("\(mode): a second STARTTLS was not refused")
                continue
            }
            #expect(type == .errInvalid)
        }
    }

    /// NOTLS: "If the server receives NBD_OPT_STARTTLS it MUST respond with ... NBD_REP_ERR_UNSUP",
    /// and "MUST NOT respond to any option request with NBD_REP_ERR_TLS_REQD".
    @Test func withoutTLSStartTLSIsUnsupportedAndNothingNeedsTLS() {
        var machine = negotiation(.off)
        guard case .send(let out) = answer(&machine, .startTLS), case .error(let type, _)? = replies(out).first else {
            Issue.record("STARTTLS was not refused")
            return
        }
        #expect(type == .errUnsupported)
        guard case .send(let list) = answer(&machine, .list) else {
            Issue.record("LIST was not answered")
            return
        }
        #expect(!replies(list).contains { $0.isError })
        // SELECTIVETLS with no TLS-only export: clear clients are served in full.
        var selective = negotiation(.on)
        guard case .enterTransmission(_, let agreement) = answer(&selective, .go(export: "disk", requests: [])) else {
            Issue.record("GO in clear was refused under --tls=on")
            return
        }
        #expect(agreement.export.name == "disk")
    }

    /// "the server MUST NOT preserve any negotiation state (such as a request for
    /// NBD_OPT_STRUCTURED_REPLY, or metadata contexts from NBD_OPT_SET_META_CONTEXT) issued
    /// before this command".
    @Test func whatWasNegotiatedBeforeTLSIsForgotten() {
        var machine = negotiation(.on)
        _ = answer(&machine, .extendedHeaders)
        _ = answer(&machine, .setMetaContext(export: "disk", queries: ["base:allocation"]))
        guard case .startTLS = answer(&machine, .startTLS) else {
            Issue.record("STARTTLS was not accepted")
            return
        }
        machine.tlsEstablished()
        guard case .send(let contexts) = answer(&machine, .setMetaContext(export: "disk", queries: ["base:allocation"])) else {
            Issue.record("SET_META_CONTEXT was not answered")
            return
        }
        #expect(replies(contexts).first?.isError == true, "structured replies from before TLS still counted")
        guard case .enterTransmission(_, let agreement) = answer(&machine, .go(export: "disk", requests: [])) else {
            Issue.record("GO over TLS was refused")
            return
        }
        #expect(agreement.format == .simple && agreement.metaContexts.isEmpty)
    }

    func connection(allowing identities: Set<String>? = nil, mode: NBDServerTLSMode = .require) -> ServerConnectionStateMachine {
        var machine = ServerConnectionStateMachine(
            exports: [Self.export],
            maximumOptionLength: 4096,
            limits: .init(maximumPayload: 65536, maximumRequestsInFlight: 4),
            handshakeTimeout: .seconds(10),
            tlsMode: mode,
            allowedIdentities: identities
        )
        machine.channelActive()
        while machine.next() != nil {}
        return machine
    }

    func actions(_ machine: inout ServerConnectionStateMachine) -> [ServerConnectionStateMachine.Action] {
        var all: [ServerConnectionStateMachine.Action] = []
        while let action = machine.next() { all.append(action) }
        return all
    }

    func clientFlags() -> ByteBuffer { ByteBuffer(integer: ClientFlags([.fixedNewstyle, .noZeroes]).rawValue) }

    /// Bytes sent in clear behind STARTTLS, before the handshake, are never read as options
    /// after it: the STARTTLS injection class is a hard disconnect.
    @Test func bytesBehindStartTLSAreAViolation() {
        var machine = connection()
        var input = clientFlags()
        input.writeImmutableBuffer(bytes(.startTLS, .structuredReply))
        machine.bytesReceived(input)
        let done = actions(&machine)
        #expect(!done.contains { if case .startTLS = $0 { true } else { false } }, "TLS was started anyway")
        guard case .fatal(let error)? = done.last else {
            Issue.record("no hard disconnect: \(done)")
            return
        }
        #expect(error.message.contains("followed NBD_OPT_STARTTLS"))
    }

    @Test func theHandshakeDeadlineCoversTheTLSHandshake() {
        var machine = connection()
        var input = clientFlags()
        input.writeImmutableBuffer(bytes(.startTLS))
        machine.bytesReceived(input)
        #expect(actions(&machine).contains { if case .startTLS = $0 { true } else { false } })
        // The client never completes its TLS handshake.
        machine.timerFired()
        guard case .fatal(let error)? = actions(&machine).last else {
            Issue.record("a stalled TLS handshake was not closed")
            return
        }
        #expect(error.code == .timedOut)
    }

    /// A client in clear has no identity: with an allow-list, TLS is required even under `on`,
    /// and under `off` too (the machine fails closed; the server refuses that configuration).
    @Test(arguments: [NBDServerTLSMode.on, .off])
    func anAllowListRequiresTLS(mode: NBDServerTLSMode) {
        var machine = connection(allowing: ["alice"], mode: mode)
        var input = clientFlags()
        input.writeImmutableBuffer(bytes(.list))
        machine.bytesReceived(input)
        guard case .write(let buffers)? = actions(&machine).last, case .error(let type, _)? = replies(buffers[0]).first else {
            Issue.record("LIST in clear was answered under an allow-list")
            return
        }
        #expect(type == .errTLSRequired)
    }

    @Test func anIdentityNotOnTheAllowListIsRefused() {
        for (identity, allowed) in [("alice", true), ("mallory", false), (nil, false)] as [(String?, Bool)] {
            var machine = connection(allowing: ["alice", "CN=backup,O=example"])
            var input = clientFlags()
            input.writeImmutableBuffer(bytes(.startTLS))
            machine.bytesReceived(input)
            _ = actions(&machine)
            machine.tlsEstablished(identity: identity)
            machine.bytesReceived(bytes(.list))
            let done = actions(&machine)
            if allowed {
                #expect(done.contains { if case .write = $0 { true } else { false } }, "alice was not served")
            } else {
                guard case .fatal(let error)? = done.last else {
                    Issue.record("\(identity ?? "nil") was served: \(done)")
                    continue
                }
                #expect(error.code == .tlsFailed && error.message.contains("allow-list"))
            }
        }
    }
}
