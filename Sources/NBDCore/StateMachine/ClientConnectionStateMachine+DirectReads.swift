import NIOCore

// What a caller that reads READ data from the socket itself needs (the client's direct reads).
extension ClientConnectionStateMachine {
    /// When the next bytes from the server are READ data: see
    /// ``ClientTransmissionStateMachine/expectedData``. Nil outside transmission.
    @inlinable public var expectedData: (context: Request, offset: UInt64, count: Int, chunkLength: Int)? {
        guard case .transmission(let state) = phase else { return nil }
        return state.machine.expectedData
    }

    /// Whether the caller may read from the socket itself now (transmission, nothing failed).
    @inlinable public var readsDirectly: Bool {
        guard case .transmission(let state) = phase else { return false }
        return !state.machine.hasFailed
    }

    /// `count` bytes of the ``expectedData`` were read by the caller, not fed.
    @inlinable public mutating func dataReadDirectly(_ count: Int) {
        guard var state = takeTransmission() else { return }
        state.machine.dataReadDirectly(count)
        phase = .transmission(state)
    }

    /// Bytes fed in transmission and not parsed yet.
    @inlinable public var unparsedByteCount: Int {
        guard case .transmission(let state) = phase else { return 0 }
        return state.machine.unparsedByteCount
    }

    /// Removes the transmission bytes fed and not parsed yet; see
    /// ``ClientTransmissionStateMachine/takeUnparsed()``.
    @inlinable public mutating func takeUnparsed() -> ByteBuffer {
        guard var state = takeTransmission() else { return ByteBuffer() }
        let unparsed = state.machine.takeUnparsed()
        phase = .transmission(state)
        return unparsed
    }
}
