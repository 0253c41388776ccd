@_spi(NBDMachines) import NBDCore

extension NBDClient {
    /// How an ``NBDClient`` connects, how many connections it keeps, and how long it waits
    /// for a server that went away.
    public struct Configuration: Sendable {
        /// How each connection connects and negotiates: TLS, timeouts, requests in flight on
        /// each connection, metadata contexts, the logger, the event loops.
        public var connection = NBDClientConfiguration()
        /// Connections to open when the server sets `NBD_FLAG_CAN_MULTI_CONN` (default 4, as
        /// nbdcopy); without it, one. A knob, not a maximum: some servers slow down as
        /// connections are added.
        public var connections = 4
        /// How long to keep dialling a lost connection, and how long requests wait for one,
        /// as qemu's `reconnect-delay`; zero (the default) turns reconnecting off, and a lost
        /// connection fails its requests and ends the client.
        public var reconnectDelay: Duration = .zero
        /// The time connections beyond the first have to connect and negotiate at the start:
        /// a server that advertises multi-conn may still accept fewer clients (`qemu-nbd -e 2`),
        /// and the client then goes on with those that connected.
        public var additionalConnectionTimeout: Duration = .seconds(2)

        /// The defaults.
        public init() {}
    }
}
