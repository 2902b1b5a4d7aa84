import Foundation
import Logging
import PostgresNIO
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting

/// PostgreSQL's statements under concurrency that SQLite's one writer never sees.
@Suite("PostgreSQL, two sessions at once")
struct PostgresRaceTests {
    @Test func aRequeueWaitingForItsDeliveryKeepsItsBodyFromAnExpiryMeanwhile() async throws {
        let url = try await PostgresServer.shared().createDatabase()
        let store = try PostgresStore(url: Secret(url), logger: quietLogger, operationTimeout: .seconds(30), protection: .sealedForTests)
        let running = Task { await store.run() }
        defer { running.cancel() }
        try await store.waitUntilMigrated(timeout: .seconds(60))

        // A dead delivery whose body is due to be deleted (a week dead, say).
        let t0 = UnixTime.now()
        let event = try EventNormalizer.normalize(body: TestEvent.body(), webhookID: nil, receivedAt: t0)
        #expect(try await store.enqueue(event, services: ["a"], at: t0, dedupSince: t0.adding(.seconds(-60))) == .accepted)
        let job = try #require(try await store.claimDue(service: "a", now: t0, limit: 1, lease: .seconds(30), ordered: false).first)
        let attempt = AttemptRecord(attempt: 1, at: t0, statusCode: 400, error: nil, durationMilliseconds: 1)
        #expect(try await store.finish(deliveryID: job.deliveryID, leasedUntil: job.leaseUntil, attempt: attempt, next: .dead))

        // Another session holds the delivery's row, so the operator's requeue waits for it.
        let release = Gate()
        defer { release.open() }
        let holder = try await holdInAnotherSession(
            url, take: ["BEGIN", "SELECT id FROM kora_deliveries WHERE id = \(job.deliveryID) FOR UPDATE"], giveBack: "COMMIT", until: release)
        let requeued = Task { try await store.requeue(id: job.deliveryID, at: .now()) }
        try await waitUntil("the requeue waits for the delivery's row") {
            try await postgresSQL(url, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE 'UPDATE kora_deliveries%'") == [1]
        }

        // Housekeeping's expiry meanwhile: the event the requeue holds is not its to take.
        let far = UnixTime(milliseconds: Int64.max / 2)
        #expect(try await store.expireBodies(deliveredBefore: far, deadBefore: far, limit: 10) == 0)
        release.open()
        try await holder.value
        #expect(try await requeued.value)
        let again = try #require(try await store.claimDue(service: "a", now: .now(), limit: 1, lease: .seconds(30), ordered: false).first)
        #expect(again.bodyProblem == nil)
        #expect(again.event.normalizedBody == event.normalizedBody)
    }
}
