import TestSupport
import Testing

@_spi(NBDMachines) @testable import NBDCore

/// The server-wide memory budget's books: the guaranteed floor, the shared half and its
/// shares, waiting in order, and nothing ever held beyond the budget.
@Suite("Memory budget ledger")
struct MemoryBudgetLedgerTests {
    /// 64 MiB for 8 connections: a floor of 4 MiB each (32 MiB), 32 MiB shared.
    func ledger() -> Books { Books(MemoryBudgetLedger(capacity: 64 << 20, holders: 8)) }

    /// The ledger in a box, so that a check can make a call that changes it.
    final class Books {
        var ledger: MemoryBudgetLedger
        init(_ ledger: MemoryBudgetLedger) { self.ledger = ledger }
        func reserve(_ holder: Int, _ amount: Int) -> Bool { ledger.reserve(holder, amount) }
        func adjust(_ holder: Int, by delta: Int) -> [Int] { ledger.adjust(holder, by: delta) }
        func holding(_ holder: Int) -> Int { ledger.holding(holder) }
        var floor: Int { ledger.floor }
        var share: Int { ledger.share }
        var total: Int { ledger.total }
        var peak: Int { ledger.peak }
        var capacity: Int { ledger.capacity }
    }

    @Test func theFloorIsAlwaysGrantedAndTheSharedHalfSplitAmongClaimants() {
        let books = ledger()
        #expect(books.floor == 4 << 20)
        // One connection alone takes its floor and the whole shared half, not more.
        #expect(books.reserve(1, 4 << 20))
        #expect(books.reserve(1, 32 << 20))
        #expect(!books.reserve(1, 1 << 20))
        // Another still gets its floor at once: nobody takes a connection's floor from it.
        #expect(books.reserve(2, 4 << 20))
        #expect(books.total == 40 << 20)
        // 1's wait is granted once it frees some of its own.
        #expect(books.adjust(1, by: -(8 << 20)) == [1])
        #expect(books.holding(1) == 29 << 20)
    }

    @Test func aConnectionOverItsShareWaitsWithoutHoldingUpTheOthers() {
        let books = ledger()
        // 1 and 2 both hold 8 MiB above their floors: two claimants, a share of 16 MiB each.
        #expect(books.reserve(1, 12 << 20))
        #expect(books.reserve(2, 12 << 20))
        #expect(books.share == 16 << 20)
        // 1 asks past its share and waits; 2, behind it, within its share, goes ahead.
        #expect(!books.reserve(1, 10 << 20))
        #expect(books.reserve(2, 6 << 20))
        // Freeing 2's memory lets 1 go on once it fits its share.
        #expect(books.adjust(2, by: -(18 << 20)) == [1])
        #expect(books.holding(1) == 22 << 20)
    }

    @Test func waitersForRoomAreServedInOrder() {
        let books = ledger()
        #expect(books.reserve(1, 4 << 20 + 30 << 20))  // the shared half all but 2 MiB
        // 2 asks for 8 MiB above its floor: no room, it waits. 3 then asks for 1 MiB above its
        // floor, which would fit, but waits behind 2; 4's request within its floor goes on.
        #expect(!books.reserve(2, 12 << 20))
        #expect(!books.reserve(3, 5 << 20))
        #expect(books.reserve(4, 4 << 20))
        // Room for 2 (and then 3) once 1 lets go.
        #expect(books.adjust(1, by: -(20 << 20)) == [2, 3])
        #expect(books.total <= books.capacity)
    }

    @Test func aHolderWithNothingSharedMayTakeOneLargeRequest() {
        let books = ledger()
        for holder in 1...3 { #expect(books.reserve(holder, 8 << 20)) }
        #expect(books.share == (32 << 20) / 3)
        // 4 holds nothing of the shared half: it takes 20 MiB of it, past its share, since
        // there is room; then it is over its share, and waits for its own requests.
        #expect(books.reserve(4, 24 << 20))
        #expect(!books.reserve(4, 1 << 20))
        #expect(books.adjust(4, by: -(20 << 20)) == [4])
    }

    /// Random reservations and releases from a printed seed: the total never passes the
    /// budget, every wait is granted once everything is freed, and the books end at zero.
    @Test func randomTrafficNeverPassesTheBudget() {
        let seed = testSeed()
        print("MemoryBudgetLedgerTests seed: \(seed)")
        var random = SeededGenerator(seed: seed)
        let books = ledger()
        var held = [Int](repeating: 0, count: 8)
        var waiting: [Int: Int] = [:]
        for _ in 0..<10000 {
            let holder = Int(random.next() % 8)
            // A connection that waits reads nothing, and frees nothing in the meantime here.
            if waiting[holder] != nil { continue }
            if held[holder] > 0, random.next() % 2 == 0 {
                let freed = Int(random.next() % UInt64(held[holder])) + 1
                held[holder] -= freed
                for granted in books.adjust(holder, by: -freed) { held[granted] += waiting.removeValue(forKey: granted)! }
            } else {
                let amount = Int(random.next() % (32 << 20)) + 1
                if books.reserve(holder, amount) { held[holder] += amount } else { waiting[holder] = amount }
            }
            #expect(books.total <= books.capacity, "seed \(seed)")
            #expect(books.total == held.reduce(0, +), "seed \(seed)")
        }
        // Everything freed, one holder at a time: every wait is granted on the way.
        while let holder = held.indices.first(where: { held[$0] > 0 }) {
            let freed = held[holder]
            held[holder] = 0
            for granted in books.adjust(holder, by: -freed) { held[granted] += waiting.removeValue(forKey: granted)! }
        }
        #expect(waiting.isEmpty && books.total == 0, "seed \(seed): \(waiting.count) still waiting")
        #expect(books.peak <= books.capacity)
    }
}
