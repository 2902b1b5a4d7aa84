import NIOConcurrencyHelpers
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting

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

    @Test func theOldestPendingAgeKeepsGrowingWhileTheOutboxCountIsLate() async throws {
        let store = InMemoryStore()
        let t0 = UnixTime.now()
        let event = try EventNormalizer.normalize(body: TestEvent.body(), webhookID: nil, receivedAt: t0)
        _ = try await store.enqueue(event, services: ["app"], at: t0, dedupSince: t0.adding(.seconds(-60)))
        let metrics = SidecarMetrics()
        let breakers = ServiceBreakers([], baseCooldown: .seconds(1), logger: quietLogger)
        func ages(at seconds: Int64) async -> (pending: Double?, counts: Double?) {
            let text = await metrics.render(
                store: store, services: ["app"], readiness: Readiness(store: store), breakers: breakers, now: t0.adding(.seconds(seconds)))
            func value(_ prefix: String) -> Double? {
                text.split(separator: "\n").first { $0.hasPrefix(prefix) }.flatMap { Double($0.split(separator: " ").last ?? "") }
            }
            return (value(#"kora_sidecar_oldest_pending_age_seconds{service="app"}"#), value("kora_sidecar_outbox_counts_age_seconds "))
        }
        #expect(await ages(at: 10).pending == 10)
        // The count outlasts the scrape's wait (a large outbox): the age still grows from what was
        // read, and the counts say how old they are.
        let gate = Gate()
        let lateAnswers = NIOLockedValueBox(0)
        store.holdDepth {
            await gate.wait()
            lateAnswers.withLockedValue { $0 += 1 }
        }
        let late = await ages(at: 100)
        #expect(late.pending == 100)
        #expect(late.counts.map { $0 > 80 } == true)
        // The late count, once in, serves the next scrape, however slow that scrape's own count is.
        _ = try await store.enqueue(
            try EventNormalizer.normalize(body: TestEvent.body(), webhookID: nil, receivedAt: t0), services: ["app"], at: t0, dedupSince: t0)
        gate.open()
        try await waitUntil("the late count answered") { lateAnswers.withLockedValue { $0 } == 1 }
        let never = Gate()
        store.holdDepth { await never.wait() }
        let text = await metrics.render(store: store, services: ["app"], readiness: Readiness(store: store), breakers: breakers, now: t0)
        #expect(text.contains(#"kora_sidecar_outbox_depth{service="app",state="pending"} 2"#))
        never.open()
    }
}
