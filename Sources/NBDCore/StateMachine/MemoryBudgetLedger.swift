/// The books of a server-wide memory budget, without I/O or locks: the bytes each connection
/// holds for requests and replies, and the connections that wait for more.
///
/// A connection asks before it takes memory a client dictates (a WRITE's data before it is
/// read, a READ's reply before it is made) with ``reserve(_:_:)``, and reports what it frees,
/// or holds without asking (reply headers, block-status replies), with ``adjust(_:by:)``.
///
/// Half the budget is guaranteed: each of at most `holders` connections may always hold its
/// ``floor`` (the budget over twice `holders`), so that no client, nor all the others
/// together, can take the budget from a connection whose requests are small. The other half is
/// shared: what a connection holds above its floor comes from it, within its share (the
/// shared half divided among the connections that hold or want some of it), and a connection
/// holding nothing of it may take one request however large, when there is room. A
/// reservation that does not fit waits (back-pressure: its requests are not read meanwhile),
/// and a later ``adjust(_:by:)`` that frees memory names it among those granted. Waiters for
/// room are served in order, so that small requests do not starve a large one; a waiter over
/// its share waits for its own requests to end, and holds up nobody.
@_spi(NBDMachines) public struct MemoryBudgetLedger: Sendable {
    /// A connection, by a number the server gives it.
    public typealias Holder = Int

    /// The bytes all connections together may hold.
    public let capacity: Int
    /// What each connection may always hold.
    public let floor: Int
    /// The bytes held now.
    public private(set) var total = 0
    /// The most held at once since the start.
    public private(set) var peak = 0
    private let guaranteedCapacity: Int
    private var sharedCapacity: Int { capacity - guaranteedCapacity }
    /// What connections hold up to their floors, and above them.
    private var guaranteedUsed = 0
    private var sharedUsed = 0
    private var holdings: [Holder: Int] = [:]
    /// Reservations not granted yet, oldest first.
    private var waiting: [(holder: Holder, amount: Int)] = []

    /// A budget of `capacity` bytes for at most `holders` connections at once, nothing held.
    public init(capacity: Int, holders: Int) {
        self.capacity = capacity
        floor = capacity / (2 * max(1, holders))
        guaranteedCapacity = floor * max(1, holders)
    }

    /// The bytes `holder` holds.
    public func holding(_ holder: Holder) -> Int { holdings[holder, default: 0] }

    /// What one connection may hold above its floor while the others that hold or want some
    /// of the shared half claim their part.
    public var share: Int {
        let above = holdings.values.count(where: { $0 > floor })
        let wanting = waiting.count(where: { holding($0.holder) <= floor && holding($0.holder) + $0.amount > floor })
        return sharedCapacity / max(1, above + wanting)
    }

    /// `holder` asks for `amount` bytes more: true when they are its now; false when it waits,
    /// and a later ``adjust(_:by:)`` names it among those granted.
    public mutating func reserve(_ holder: Holder, _ amount: Int) -> Bool {
        let held = holding(holder)
        // With nobody waiting, what fits is granted without joining the queue.
        if waiting.isEmpty, fits(amount, heldBy: held) == nil {
            hold(holder, held + amount)
            return true
        }
        waiting.append((holder, amount))
        return grantWaiting().contains(holder)
    }

    /// `holder` holds `delta` bytes more, or fewer when negative, without asking. Returns the
    /// waiting holders whose reservations this granted.
    public mutating func adjust(_ holder: Holder, by delta: Int) -> [Holder] {
        guard delta != 0 else { return [] }
        assert(holding(holder) + delta >= 0, "a connection released more than it held")
        hold(holder, holding(holder) + delta)
        return delta < 0 ? grantWaiting() : []
    }

    private mutating func hold(_ holder: Holder, _ bytes: Int) {
        let before = holding(holder)
        holdings[holder] = bytes > 0 ? bytes : nil
        guaranteedUsed += min(bytes, floor) - min(before, floor)
        sharedUsed += max(0, bytes - floor) - max(0, before - floor)
        total += bytes - before
        peak = max(peak, total)
    }

    /// Whether `amount` more for a holder of `held` fits: `nil` when it does, else whether it
    /// waits for room (rather than for its own requests to end).
    private func fits(_ amount: Int, heldBy held: Int) -> Bool? {
        let underFloor = max(0, min(amount, floor - held))
        let aboveFloor = amount - underFloor
        guard guaranteedUsed + underFloor <= guaranteedCapacity else { return true }
        guard aboveFloor > 0 else { return nil }
        let sharedHeld = max(0, held - floor)
        if sharedHeld > 0, sharedHeld + aboveFloor > share { return false }
        return sharedUsed + aboveFloor <= sharedCapacity ? nil : true
    }

    /// Grants, in order, what fits. Once one waits for room, those behind it that need room
    /// wait too; one over its share waits for its own requests and holds up nobody.
    private mutating func grantWaiting() -> [Holder] {
        var granted: [Holder] = []
        var waitingForRoom = false
        var index = 0
        while index < waiting.count {
            let (holder, amount) = waiting[index]
            let held = holding(holder)
            if let forRoom = fits(amount, heldBy: held) {
                waitingForRoom = waitingForRoom || forRoom
                index += 1
            } else if waitingForRoom, amount > max(0, floor - held) {
                index += 1
            } else {
                waiting.remove(at: index)
                hold(holder, held + amount)
                granted.append(holder)
            }
        }
        return granted
    }
}
