import NIOConcurrencyHelpers
import Testing

@testable import KoraSidecar

@Suite("One run at a time")
struct SingleFlightTests {
    @Test func callersWhileARunIsUnderWayShareItAndTheNextCallRunsAgain() async throws {
        let flight = SingleFlight<Int>()
        let runs = NIOLockedValueBox(0)
        let gate = Gate()
        let work: @Sendable () async -> Int = {
            let run = runs.withLockedValue { runs in
                runs += 1
                return runs
            }
            await gate.wait()
            return run
        }
        // Ten scrapes against a store that does not answer: one query, not ten.
        async let results = withTaskGroup(of: Int.self) { group in
            for _ in 0..<10 { group.addTask { await flight.run(work) } }
            return await group.reduce(into: []) { $0.append($1) }
        }
        try await waitUntil("every caller waits for the first run") { flight.callers == 10 }
        gate.open()
        #expect(await results.count == 10)
        #expect(runs.withLockedValue { $0 } == 1)
        #expect(Set(await results) == [1])
        // Once it has answered, the next caller gets a fresh run.
        #expect(await flight.run(work) == 2)
    }
}
