/// What a copy did.
public struct CopyReport: Sendable {
    /// The bytes of the source copied (or found done), from its start: its size, unless the
    /// copy was stopped or the source is a stream.
    public var bytes: UInt64
    /// Of ``bytes``, those that needed nothing: clean in the bitmap of an incremental copy, or
    /// copied by an earlier run of a resumed one.
    public var skippedBytes: UInt64
    /// Of a resumed copy, the bytes an earlier run had copied, which this one did not copy again.
    public var resumedBytes: UInt64
    /// The source's blkhash, when ``CopyOptions/blockHash`` asked for it and the copy ended.
    public var blockHash: BlockHash?
    /// True when the copy was stopped (``CopyStop``) before its end: what was in flight was
    /// finished, and a journal records it.
    public var stopped: Bool
}
