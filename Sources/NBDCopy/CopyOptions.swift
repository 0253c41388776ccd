/// How a copy, a checksum or a verification goes: the sizes and counts of `nbd copy`'s options.
/// The defaults are the tool's.
public struct CopyOptions: Sendable {
    /// Bytes per request; raised to the largest preferred block size of the NBD endpoints.
    /// From 1 byte to 32 MiB.
    public var requestSize: UInt64 = 256 << 10
    /// Requests in flight per NBD connection.
    public var requests = 64
    /// The most memory the data in flight takes: requests in flight are capped at this over
    /// the request size, with one per connection at least.
    public var memory: UInt64 = Copier.defaultMemory
    /// Blocks of this many zero bytes are zeroed (or skipped, on a destination that starts
    /// zeroed), not written; 0 writes zeroes as data.
    public var sparseBlockSize = 4096
    /// Flush the destination at the end, so that what was written is durable.
    public var flush = false
    /// Compute the source's blkhash as the data passes (``CopyReport/blockHash``). Not with an
    /// incremental copy, which reads only what changed.
    public var blockHash: BlockHashSpecification?
    /// Keep a journal, so that a copy interrupted is finished by the next one with the same
    /// journal, copying only the rest.
    public var journal: Journal?

    public init() {}

    /// A resumable copy's journal: the file, the names that tell whether a journal found
    /// there is this copy's (another copy's is refused, never applied), and the state of the
    /// source being copied.
    ///
    /// What a journal records as copied was read from the source as it was then; a resumed
    /// copy reads the rest as it is now. A resume is therefore refused unless the source is
    /// shown to be in the same state: by ``sourceState``, the same in every run, or by the
    /// source itself (``CopySource/stateIdentity``: a regular file's inode, size and change
    /// time). An export cannot show it, so resuming a copy from an export needs a
    /// ``sourceState``.
    public struct Journal: Sendable {
        /// The journal file; `PATH.lock` beside it is locked while the copy runs, so that the
        /// same copy started twice at once is refused.
        public var path: String
        /// What the source is called: the same name each run (an NBD URI, a full path).
        public var source: String
        /// What the destination is called.
        public var destination: String
        /// The caller's name for the state of the source being copied, which stays the same
        /// while it is copied: a snapshot's or a backup job's id. A resume that names another
        /// state, or none where the first run named one, is refused.
        public var sourceState: String?

        public init(path: String, source: String, destination: String, sourceState: String? = nil) {
            self.path = path
            self.source = source
            self.destination = destination
            self.sourceState = sourceState
        }
    }

    /// Throws ``NBDCopyError/Code/invalidArgument`` for values that cannot work.
    func validate() throws {
        guard requests > 0, requestSize > 0, memory > 0, sparseBlockSize >= 0 else {
            throw NBDCopyError(.invalidArgument, "the request size, requests in flight and memory must be positive")
        }
        guard requestSize <= 32 << 20 else { throw NBDCopyError(.invalidArgument, "the request size must be at most 32M") }
    }
}
