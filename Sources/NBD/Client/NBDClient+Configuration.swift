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
        /// Bytes of write data answered and not yet flushed that the client keeps, with a
        /// reconnect delay, to send again after a reconnection (default 64 MiB).
        ///
        /// A server answers a write before it is durable: only a flush makes it so, and a
        /// server that restarts before the flush (a write-back cache, a host that crashed) may
        /// lose it. So each write, write-zeroes and trim answered is kept, from the caller's own
        /// buffer (nothing is copied), until a flush covers it; after a reconnection they are
        /// sent again in the order they were answered, and flushed, before any other request.
        /// When the kept data would pass the window, the client flushes by itself and drops
        /// what that flush covered; writes in flight meanwhile may take it past the window by
        /// their own size. Zero keeps no data: a flush after a reconnection that may have lost
        /// writes then fails with `NBDError.Code.writesInDoubt`. Writes with FUA are kept too,
        /// though durable once answered: an earlier write they overwrote is sent again, and
        /// they must follow it. Nothing is kept for a server that cannot flush.
        public var replayWindow = 64 << 20
        /// How long ``NBDClient/run()`` keeps dialling the first connection while nothing
        /// answers (refused, no socket yet, closed at once, timed out), as qemu's
        /// `open-timeout`: a client started with its server, or before it, waits for it. Zero
        /// (the default) dials once and fails at once. A server that answers and refuses (an
        /// unknown export, TLS) is not dialled again.
        public var openTimeout: Duration = .zero

        /// The defaults.
        public init() {}
    }
}
