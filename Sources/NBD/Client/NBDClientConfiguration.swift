import Logging
@_spi(NBDMachines) import NBDCore
import NIOCore
import NIOPosix

/// How a client connects and what it negotiates. The defaults suit most servers.
public struct NBDClientConfiguration: Sendable {
    /// The richest framing the one-call ``NBDExport/connect(to:configuration:)-(NBDURI,_)``
    /// asks for: `.extended` (the default) asks for `NBD_OPT_EXTENDED_HEADERS` (64-bit
    /// requests and block status), then for `NBD_OPT_STRUCTURED_REPLY` (sparse reads, block
    /// status, error messages) when the server refuses, then goes on with simple replies, as
    /// qemu does; `.structured` starts at the second step and `.simple` asks for neither.
    public var transmissionFormat = TransmissionFormat.extended
    /// Metadata contexts the one-call ``NBDExport/connect(to:configuration:)-(NBDURI,_)`` selects.
    public var metaContexts: [NBDMetaContext] = [.baseAllocation]
    /// The `NBD_INFO_*` items asked for with INFO and GO. The export item always comes.
    public var infoRequests: [InfoType] = [.name, .description, .blockSize]
    /// Requests on the wire at once; more wait their turn (back-pressure).
    public var maximumRequestsInFlight = 64
    /// In clear, read the data of large READ replies from the socket straight into the
    /// buffers of ``NBDExport/read(into:at:length:flags:)`` and ``NBDExport/read(at:length:flags:)``,
    /// as libnbd does, instead of copying it there from SwiftNIO's receive buffers (the
    /// default). Turn it off for a connection whose data is only passed on with
    /// ``NBDExport/readSegments(at:length:flags:)``: SwiftNIO then reads every byte in large
    /// buffers, one read fewer each time the socket becomes readable (`nbd copy` does this for
    /// data it only hashes or throws away).
    public var readsDataDirectly = true
    /// How long to wait for the socket to connect.
    public var connectTimeout: Duration = .seconds(10)
    /// How long each negotiation step (greeting, each option's replies) may take.
    public var negotiationTimeout: Duration = .seconds(30)
    /// How long a request may wait for its reply once sent: 60 s by default, as the `nbd`
    /// tool, so that a server that froze never hangs a caller for good; nil waits for ever, as
    /// libnbd does. A request not answered in time fails with `NBDError.Code.timedOut`, the
    /// connection is closed hard (what the server did is unknown), and every other request
    /// fails at once with the same error; an ``NBDClient`` with a reconnect delay dials again
    /// and sends them again instead. Raise it for requests a server may take long over (a
    /// large write-zeroes without fast zeroing, a flush of a large cache).
    public var requestTimeout: Duration? = .seconds(60)
    /// Largest single reply to an option accepted while negotiating (by default 8196 bytes:
    /// two strings of the spec's 4096-byte limit); a larger one ends the connection.
    public var maximumOptionReplyLength = OptionReply.defaultMaximumLength
    /// Largest total of the replies to one option (16 MiB by default: a long `NBD_OPT_LIST`).
    public var maximumOptionRepliesLength = 16 << 20
    /// TLS: off by default; `NBDConnection.connect(to: NBDURI)` takes it from the URI.
    public var tls = NBDTLSConfiguration()
    /// Whether a URI's `tls-certificates` and `tls-psk-file` parameters may make the library
    /// read local files, as libnbd's `nbd_set_uri_allow_local_file`. Off by default: a service
    /// that connects to URIs its users give would otherwise let them point it at files of its
    /// own. Such a URI then fails with `NBDError.Code.invalidURI`, naming the parameter, and
    /// nothing is read or dialled. Turn it on where the URI comes from the person running the
    /// program (the `nbd` tool does), or set ``tls`` yourself.
    public var uriMayReadLocalFiles = false
    /// Where debug and trace messages go; by default nowhere.
    public var logger = Logger(label: "nbd", factory: { _ in SwiftLogNoOpLogHandler() })
    /// The event loops that run the connection.
    public var eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton

    /// The defaults.
    public init() {}
}
