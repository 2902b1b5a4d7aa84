import Foundation
import Logging
import NIOConcurrencyHelpers
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

/// One behaviour suite for every store implementation.
@Suite("Store behaviour")
struct StoreTests {
    enum Kind: String, CaseIterable, Sendable, CustomTestStringConvertible {
        case memory, sqlite, postgres
        var testDescription: String { rawValue }
    }

    /// A fresh store of `kind`, and what removes it.
    func makeStore(_ kind: Kind, protection: DataProtection = .sealedForTests) async throws -> (store: any SidecarStore, cleanup: @Sendable () -> Void) {
        switch kind {
        case .postgres:
            let store = try PostgresStore(
                url: Secret(try await PostgresServer.shared().createDatabase()), logger: Logger(label: "test"),
                operationTimeout: .seconds(5) * Sanitizer.slowdown, protection: protection)
            let running = Task { await store.run() }
            try await store.waitUntilMigrated(timeout: .seconds(60))
            return (store, { running.cancel() })
        case .memory:
            return (InMemoryStore(), {})
        case .sqlite:
            let directory = try temporaryDirectory()
            let store = try SQLiteStore(path: directory + "/store.sqlite", protection: protection)
            return (store, { store.close(); try? FileManager.default.removeItem(atPath: directory) })
        }
    }

    func event(_ id: String, verification: String = "ver_" + RandomID.make()) throws -> KoraEvent {
        try EventNormalizer.normalize(
            body: TestEvent.body(eventID: id, verificationID: verification), webhookID: nil, receivedAt: .now(),
            originalHeaders: [("X-Signature", "abc")])
    }

    let t0 = UnixTime(milliseconds: 1_800_000_000_000)
    func at(_ seconds: Int64) -> UnixTime { UnixTime(milliseconds: t0.milliseconds + seconds * 1000) }

    @Test(arguments: Kind.allCases)
    func anUnverifiedEventNeverMakesAVerifiedOneItsDuplicate(kind: Kind) async throws {
        let (store, cleanup) = try await makeStore(kind)
        defer { cleanup() }
        func copy(_ id: String, verified: Bool) throws -> KoraEvent {
            try EventNormalizer.normalize(body: TestEvent.body(eventID: id), webhookID: nil, receivedAt: .now(), signatureVerified: verified)
        }
        // Report-only mode: a forgery first, then Kora's signed event with its id.
        #expect(try await store.enqueue(copy("e1", verified: false), services: ["a"], at: t0, dedupSince: at(-100)) == .accepted)
        #expect(try await store.enqueue(copy("e1", verified: true), services: ["a"], at: at(1), dedupSince: at(-99)) == .accepted)
        // After a verified event, an unverified copy (Kora's, failing verification) is a duplicate, and so is a second unverified one.
        #expect(try await store.enqueue(copy("e2", verified: true), services: ["a"], at: t0, dedupSince: at(-100)) == .accepted)
        #expect(try await store.enqueue(copy("e2", verified: false), services: ["a"], at: at(1), dedupSince: at(-99)) == .duplicate)
        #expect(try await store.enqueue(copy("e1", verified: false), services: ["a"], at: at(2), dedupSince: at(-98)) == .duplicate)
        #expect(try await store.deliveries(status: .pending, limit: 10).count == 3)
    }

    @Test(arguments: Kind.allCases)
    func enqueueDeduplicatesWithinTheWindow(kind: Kind) async throws {
        let (store, cleanup) = try await makeStore(kind)
        defer { cleanup() }
        #expect(try await store.enqueue(event("e1"), services: ["a", "b"], at: t0, dedupSince: at(-100)) == .accepted)
        #expect(try await store.enqueue(event("e1"), services: ["a", "b"], at: at(1), dedupSince: at(-99)) == .duplicate)
        // Outside the window the same id is new again.
        #expect(try await store.enqueue(event("e1"), services: ["a"], at: at(200), dedupSince: at(100)) == .accepted)
        #expect(try await store.deliveries(status: .pending, limit: 10).count == 3)
        #expect(try await store.isDuplicate(eventID: "e1", since: at(150)))
        #expect(try await !store.isDuplicate(eventID: "e2", since: at(-1000)))
        try await store.remember([("e2", t0), ("e3", at(5)), ("e3", at(2))])
        #expect(try await store.isDuplicate(eventID: "e2", since: at(-1)))
        #expect(try await !store.isDuplicate(eventID: "e2", since: at(1)))
        // An id given twice keeps its later time.
        #expect(try await store.isDuplicate(eventID: "e3", since: at(5)))
        #expect(try await !store.isDuplicate(eventID: "e3", since: at(6)))
    }

    @Test(arguments: Kind.allCases)
    func anEventNoServiceTakesIsKeptUntilRoutedOrPruned(kind: Kind) async throws {
        let (store, cleanup) = try await makeStore(kind)
        defer { cleanup() }
        let first = try event("u1")
        #expect(try await store.enqueue(first, services: [], at: t0, dedupSince: at(-100)) == .accepted)
        #expect(try await store.enqueue(event("u2"), services: [], at: at(1), dedupSince: at(-100)) == .accepted)
        #expect(try await store.enqueue(event("u1"), services: [], at: at(2), dedupSince: at(-100)) == .duplicate)
        let kept = try await store.unrouted(limit: nil)
        #expect(kept.map(\.eventID) == ["u2", "u1"])
        #expect(kept[0].eventType == "verification.completed")
        #expect(try await store.unrouted(limit: 1).map(\.eventID) == ["u2"])
        #expect(try await store.unroutedCount() == 2)
        // Pruning delivered rows keeps unrouted events inside the de-duplication window.
        _ = try await store.prune(deliveredBefore: at(100), seenBefore: at(-100), limit: 1000)
        #expect(try await store.unroutedCount() == 2)

        // Routed: deliveries appear, the event is no longer unrouted, and routing it twice adds nothing.
        let row = try #require(kept.first { $0.eventID == "u1" }?.row)
        #expect(try await store.route([(row, ["a", "b"])], at: at(5)) == 2)
        #expect(try await store.route([(row, ["a", "b"])], at: at(6)) == 0)
        #expect(try await store.unrouted(limit: nil).map(\.eventID) == ["u2"])
        let claimed = try await store.claimDue(service: "a", now: at(5), limit: 10, lease: .seconds(30))
        #expect(claimed.map(\.event.id) == ["u1"])
        #expect(claimed.first?.event == first)

        // Past the window an unrouted event goes, like a quarantined payload.
        _ = try await store.prune(deliveredBefore: at(100), seenBefore: at(100), limit: 1000)
        #expect(try await store.unroutedCount() == 0)
        #expect(try await store.claimDue(service: "b", now: at(7), limit: 10, lease: .seconds(30)).map(\.event.id) == ["u1"])
    }

    @Test(arguments: Kind.allCases)
    func aVerificationsLaterEventWaitsWhileAnEarlierOneIsPending(kind: Kind) async throws {
        let (store, cleanup) = try await makeStore(kind)
        defer { cleanup() }
        _ = try await store.enqueue(event("v1-first", verification: "ver_1"), services: ["a", "b"], at: t0, dedupSince: at(-100))
        _ = try await store.enqueue(event("v1-second", verification: "ver_1"), services: ["a"], at: at(1), dedupSince: at(-100))
        _ = try await store.enqueue(event("v2-only", verification: "ver_2"), services: ["a"], at: at(2), dedupSince: at(-100))
        let first = try await store.claimDue(service: "a", now: at(5), limit: 10, lease: .seconds(30), ordered: true)
        #expect(first.map(\.event.id) == ["v1-first", "v2-only"])
        let done = AttemptRecord(attempt: 1, at: at(5), statusCode: 204, error: nil, durationMilliseconds: 1)
        try await store.finish(deliveryID: first[1].deliveryID, leasedUntil: first[1].leaseUntil, attempt: done, next: .delivered)
        // A retry keeps the later event waiting, and the wait is not "due now".
        let failed = AttemptRecord(attempt: 1, at: at(5), statusCode: 500, error: nil, durationMilliseconds: 1)
        try await store.finish(deliveryID: first[0].deliveryID, leasedUntil: first[0].leaseUntil, attempt: failed, next: .retry(at: at(60)))
        #expect(try await store.claimDue(service: "a", now: at(10), limit: 10, lease: .seconds(30), ordered: true).isEmpty)
        #expect(try await store.nextDueTime(service: "a", ordered: true) == at(60))
        // Unordered, the later event would go now; another service is not held up either way.
        #expect(try await store.nextDueTime(service: "a", ordered: false) == at(1))
        #expect(try await store.claimDue(service: "b", now: at(10), limit: 10, lease: .seconds(30), ordered: true).count == 1)
        // Once the earlier one is delivered (or dead), the later one goes.
        let retried = try #require(try await store.claimDue(service: "a", now: at(60), limit: 10, lease: .seconds(30), ordered: true).first)
        #expect(retried.event.id == "v1-first")
        let delivered = AttemptRecord(attempt: 2, at: at(61), statusCode: 204, error: nil, durationMilliseconds: 1)
        let next = try await store.finishAndClaimNext(
            deliveryID: retried.deliveryID, leasedUntil: retried.leaseUntil, attempt: delivered, next: .delivered, service: "a", now: at(61), lease: .seconds(30), ordered: true)
        #expect(next.recorded && next.next?.event.id == "v1-second")
    }

    @Test(arguments: Kind.allCases)
    func aFilterSelectsWhatIsQueuedAgain(kind: Kind) async throws {
        let (store, cleanup) = try await makeStore(kind)
        defer { cleanup() }
        // Three events accepted at 0 s, 10 s and 20 s, each for services a and b; all delivered but
        // the last one's delivery to b, which is dead.
        for (index, id) in ["f0", "f1", "f2"].enumerated() {
            let event = try EventNormalizer.normalize(
                body: TestEvent.body(type: index == 1 ? "fraud_alert.created" : "verification.completed", eventID: id, verificationID: "ver_\(index)"),
                webhookID: nil, receivedAt: at(Int64(index * 10)))
            _ = try await store.enqueue(event, services: ["a", "b"], at: at(Int64(index * 10)), dedupSince: at(-100))
        }
        for job in try await store.claimDue(service: "a", now: at(30), limit: 10, lease: .seconds(30))
            + store.claimDue(service: "b", now: at(30), limit: 10, lease: .seconds(30))
        {
            let dead = job.event.id == "f2" && job.service == "b"
            let record = AttemptRecord(attempt: 1, at: at(31), statusCode: dead ? 500 : 204, error: nil, durationMilliseconds: 1)
            try await store.finish(deliveryID: job.deliveryID, leasedUntil: job.leaseUntil, attempt: record, next: dead ? .dead : .delivered)
        }
        func count(_ filter: DeliveryFilter) async throws -> Int { try await store.requeue(filter, at: at(40), dryRun: true).selected }
        #expect(try await count(DeliveryFilter(statuses: [.delivered])) == 5)
        #expect(try await count(DeliveryFilter(statuses: [.delivered], service: "a")) == 3)
        #expect(try await count(DeliveryFilter(statuses: [.delivered], eventType: "fraud_alert.created")) == 2)
        #expect(try await count(DeliveryFilter(statuses: [.delivered], verificationID: "ver_0")) == 2)
        #expect(try await count(DeliveryFilter(statuses: [.delivered], since: at(10), until: at(20))) == 2)
        #expect(try await count(DeliveryFilter(statuses: [.delivered, .dead], eventID: "f2")) == 2)
        // A dry run changed nothing; a real one makes exactly the selection due again.
        #expect(try await store.deliveries(status: .pending, limit: 10).isEmpty)
        #expect(try await store.requeue(DeliveryFilter(statuses: [.delivered, .dead], service: "b", eventID: "f2"), at: at(40), dryRun: false).selected == 1)
        let pending = try await store.deliveries(status: .pending, limit: 10)
        #expect(pending.map(\.eventID) == ["f2"])
        let again = try await store.claimDue(service: "b", now: at(40), limit: 10, lease: .seconds(30))
        #expect(again.map(\.attempt) == [2])
    }

    @Test(arguments: Kind.allCases)
    func anIdempotencyKeyIsClaimedOnceAndKeepsItsAnswer(kind: Kind) async throws {
        let (store, cleanup) = try await makeStore(kind)
        defer { cleanup() }
        #expect(try await store.claimIdempotencyKey(service: "app", key: "k", digest: "d1", at: t0) == nil)
        let second = try #require(try await store.claimIdempotencyKey(service: "app", key: "k", digest: "d2", at: at(1)))
        #expect(second.digest == "d1")
        #expect(second.state == .inFlight)
        #expect(second.createdAt == t0)
        // Keys are per service.
        #expect(try await store.claimIdempotencyKey(service: "other", key: "k", digest: "d1", at: at(1)) == nil)
        let answer = IdempotencyRecord.State.answered(status: 201, contentType: "application/json", body: Array(#"{"id":"ver_1"}"#.utf8))
        try await store.settleIdempotencyKey(service: "app", key: "k", state: answer, at: at(2))
        let settled = try #require(try await store.idempotencyRecord(service: "app", key: "k"))
        #expect(settled.state == answer)
        #expect(settled.updatedAt == at(2))
        try await store.settleIdempotencyKey(service: "other", key: "k", state: .unknown, at: at(3))
        #expect(try await store.idempotencyRecord(service: "other", key: "k")?.state == .unknown)
        #expect(try await store.pruneIdempotencyKeys(before: at(1), limit: 1000) == 1)
        #expect(try await store.idempotencyRecord(service: "app", key: "k") == nil)
        #expect(try await store.idempotencyRecord(service: "other", key: "k") != nil)
        // In batches: at most `limit` each time.
        _ = try await store.claimIdempotencyKey(service: "app", key: "k2", digest: "d", at: at(1))
        for expected in [1, 1, 0] { #expect(try await store.pruneIdempotencyKeys(before: at(5), limit: 1) == expected) }
    }

    @Test(arguments: Kind.allCases)
    func oneRepeatTakesAnUnknownCreateOver(kind: Kind) async throws {
        let (store, cleanup) = try await makeStore(kind)
        defer { cleanup() }
        #expect(try await store.claimIdempotencyKey(service: "app", key: "k", digest: "d", at: t0) == nil)
        try await store.settleIdempotencyKey(service: "app", key: "k", state: .unknown, at: at(1))
        let seen = try #require(try await store.idempotencyRecord(service: "app", key: "k"))
        // Two repeats read the same record: the first takes it over, the second finds it changed.
        #expect(try await store.takeOverIdempotencyKey(service: "app", key: "k", from: seen, at: at(2)))
        #expect(try await !store.takeOverIdempotencyKey(service: "app", key: "k", from: seen, at: at(3)))
        let taken = try #require(try await store.idempotencyRecord(service: "app", key: "k"))
        #expect(taken.state == .inFlight && taken.updatedAt == at(2) && taken.digest == "d" && taken.createdAt == t0)
        // Left in flight too long, it is taken over the same way, once.
        #expect(try await store.takeOverIdempotencyKey(service: "app", key: "k", from: taken, at: at(4)))
        #expect(try await !store.takeOverIdempotencyKey(service: "app", key: "k", from: taken, at: at(5)))
        #expect(try await !store.takeOverIdempotencyKey(service: "app", key: "absent", from: taken, at: at(6)))
    }

    @Test(arguments: Kind.allCases)
    func anEventWhoseVerificationIDNoStoreCanIndexIsStoredWithoutOne(kind: Kind) async throws {
        // PostgreSQL refuses a NUL in text, and a btree entry of kilobytes: enqueue failed on every retry.
        let (store, cleanup) = try await makeStore(kind)
        defer { cleanup() }
        for (index, verification) in ["ver_\u{0}_1", "ver_" + String(repeating: "x", count: 1100)].enumerated() {
            let stored = try event("e\(index)", verification: verification)
            #expect(stored.verificationID == nil)
            #expect(try await store.enqueue(stored, services: ["a"], at: t0, dedupSince: at(-1000)) == .accepted)
        }
        #expect(try await store.claimDue(service: "a", now: at(1), limit: 10, lease: .seconds(30)).count == 2)
    }

    @Test(arguments: Kind.allCases)
    func aWorkerWhoseLeaseRanOutRecordsNothingOverTheNextOnesResult(kind: Kind) async throws {
        // A stalled worker (or a replica whose clock is behind) finishes after its lease ended and
        // another worker delivered: its late "retry" turned the delivery back to pending (sent again).
        let (store, cleanup) = try await makeStore(kind)
        defer { cleanup() }
        _ = try await store.enqueue(event("e0"), services: ["a"], at: t0, dedupSince: at(-1000))
        let stalled = try #require(try await store.claimDue(service: "a", now: at(1), limit: 1, lease: .seconds(30)).first)
        let next = try #require(try await store.claimDue(service: "a", now: at(40), limit: 1, lease: .seconds(30)).first)
        #expect(next.deliveryID == stalled.deliveryID)
        #expect(
            try await store.finish(
                deliveryID: next.deliveryID, leasedUntil: next.leaseUntil,
                attempt: .init(attempt: 1, at: at(41), statusCode: 204, error: nil, durationMilliseconds: 5), next: .delivered))
        // Told, so that the worker announces nothing (a "dead" it could not record) and says why.
        #expect(
            try await !store.finish(
                deliveryID: stalled.deliveryID, leasedUntil: stalled.leaseUntil,
                attempt: .init(attempt: 1, at: at(42), statusCode: nil, error: "timed out", durationMilliseconds: 35_000), next: .dead))
        let detail = try #require(try await store.delivery(id: stalled.deliveryID))
        #expect(detail.summary.status == .delivered)
        #expect(detail.attempts.map(\.statusCode) == [204])
    }

    @Test(arguments: Kind.allCases)
    func aRetryOfADeliveryBeingSentLeavesItWithItsWorker(kind: Kind) async throws {
        let (store, cleanup) = try await makeStore(kind)
        defer { cleanup() }
        for id in ["e0", "e1"] { _ = try await store.enqueue(event(id), services: ["a"], at: t0, dedupSince: at(-1000)) }
        let held = try await store.claimDue(service: "a", now: at(1), limit: 2, lease: .seconds(30))
        #expect(held.count == 2)
        // An operator retries one, then every pending delivery, while a worker is sending them.
        #expect(try await store.requeue(id: held[0].deliveryID, at: at(2)))
        #expect(try await store.requeue(DeliveryFilter(statuses: [.pending]), at: at(2), dryRun: false).selected == 2)
        #expect(try await store.deliveries(status: nil, limit: 10).map(\.updatedAt) == [at(2), at(2)])
        #expect(try await store.claimDue(service: "a", now: at(3), limit: 10, lease: .seconds(30)).isEmpty)
        // A lease that has ended is no obstacle: both are due again after it.
        #expect(try await store.claimDue(service: "a", now: at(31), limit: 10, lease: .seconds(30)).count == 2)
    }

    @Test(arguments: Kind.allCases)
    func claimLeasesDueDeliveriesOldestFirst(kind: Kind) async throws {
        let (store, cleanup) = try await makeStore(kind)
        defer { cleanup() }
        for index in 0..<3 {
            _ = try await store.enqueue(event("e\(index)"), services: ["a", "b"], at: at(Int64(index)), dedupSince: at(-1000))
        }
        let first = try await store.claimDue(service: "a", now: at(10), limit: 2, lease: .seconds(30))
        #expect(first.map(\.event.id) == ["e0", "e1"])
        #expect(first.allSatisfy { $0.attempt == 1 && $0.service == "a" })
        #expect(first[0].event.originalHeaders.map(\.name) == ["X-Signature"])
        // Leased deliveries are not handed out twice; the other service is independent.
        #expect(try await store.claimDue(service: "a", now: at(11), limit: 10, lease: .seconds(30)).map(\.event.id) == ["e2"])
        #expect(try await store.claimDue(service: "b", now: at(11), limit: 10, lease: .seconds(30)).count == 3)
        // An unfinished lease expires and the delivery is due again.
        #expect(try await store.claimDue(service: "a", now: at(45), limit: 10, lease: .seconds(30)).map(\.event.id) == ["e0", "e1", "e2"])
        // At start-up a store of its own ends the last run's leases; a shared one keeps other replicas' leases.
        try await store.releaseLeases()
        #expect(try await store.claimDue(service: "a", now: at(46), limit: 10, lease: .seconds(30)).count == (kind == .postgres ? 0 : 3))
    }

    @Test(arguments: Kind.allCases)
    func finishingADeliveryLeasesTheNextDueOne(kind: Kind) async throws {
        let (store, cleanup) = try await makeStore(kind)
        defer { cleanup() }
        for index in 0..<2 {
            _ = try await store.enqueue(event("e\(index)"), services: ["a"], at: at(Int64(index)), dedupSince: at(-1000))
        }
        let first = try #require(try await store.claimDue(service: "a", now: at(10), limit: 1, lease: .seconds(30)).first)
        let delivered = AttemptRecord(attempt: 1, at: at(10), statusCode: 204, error: nil, durationMilliseconds: 2)
        let second = try await store.finishAndClaimNext(
            deliveryID: first.deliveryID, leasedUntil: first.leaseUntil, attempt: delivered, next: .delivered, service: "a", now: at(11),
            lease: .seconds(30), ordered: false)
        #expect(second.recorded && second.next?.event.id == "e1")
        #expect(try await store.delivery(id: first.deliveryID)?.summary.status == .delivered)
        // The next one is leased: no other worker gets it until the lease ends.
        #expect(try await store.claimDue(service: "a", now: at(12), limit: 10, lease: .seconds(30)).isEmpty)
        let retaken = try await store.claimDue(service: "a", now: at(42), limit: 10, lease: .seconds(30))
        #expect(retaken.map(\.event.id) == ["e1"])
        // With nothing left to lease, the attempt is still recorded (under the lease that holds it now).
        let last = try await store.finishAndClaimNext(
            deliveryID: try #require(retaken.first).deliveryID, leasedUntil: try #require(retaken.first).leaseUntil, attempt: delivered,
            next: .retry(at: at(100)), service: "a", now: at(43), lease: .seconds(30), ordered: false)
        #expect(last.recorded && last.next == nil)
        #expect(try await store.nextDueTime(service: "a", ordered: false) == at(100))
    }

    @Test(arguments: Kind.allCases)
    func attemptsMoveDeliveriesThroughTheirStates(kind: Kind) async throws {
        let (store, cleanup) = try await makeStore(kind)
        defer { cleanup() }
        _ = try await store.enqueue(event("e1"), services: ["a"], at: t0, dedupSince: at(-1))
        let job = try #require(try await store.claimDue(service: "a", now: t0, limit: 1, lease: .seconds(30)).first)
        try await store.finish(
            deliveryID: job.deliveryID, leasedUntil: job.leaseUntil, attempt: .init(attempt: 1, at: t0, statusCode: 500, error: nil, durationMilliseconds: 3),
            next: .retry(at: at(60)))
        #expect(try await store.claimDue(service: "a", now: at(59), limit: 1, lease: .seconds(30)).isEmpty)
        #expect(try await store.nextDueTime(service: "a", ordered: false) == at(60))
        let second = try #require(try await store.claimDue(service: "a", now: at(60), limit: 1, lease: .seconds(30)).first)
        #expect(second.attempt == 2)
        try await store.finish(
            deliveryID: second.deliveryID, leasedUntil: second.leaseUntil, attempt: .init(attempt: 2, at: at(60), statusCode: nil, error: "connection refused", durationMilliseconds: 1),
            next: .dead)
        let detail = try #require(try await store.delivery(id: job.deliveryID))
        #expect(detail.summary.status == .dead)
        #expect(detail.summary.attempts == 2)
        #expect(detail.summary.lastError == "connection refused")
        #expect(detail.attempts.map(\.statusCode) == [500, nil])
        #expect(try await store.deliveries(status: .dead, limit: 10).map(\.id) == [job.deliveryID])

        #expect(try await store.requeue(id: job.deliveryID, at: at(70)))
        let third = try #require(try await store.claimDue(service: "a", now: at(70), limit: 1, lease: .seconds(30)).first)
        #expect(third.attempt == 3)
        try await store.finish(
            deliveryID: third.deliveryID, leasedUntil: third.leaseUntil, attempt: .init(attempt: 3, at: at(70), statusCode: 204, error: nil, durationMilliseconds: 1),
            next: .delivered)
        #expect(try await store.deliveries(status: .delivered, limit: 10).count == 1)
        #expect(try await !store.requeue(id: job.deliveryID, at: at(80)))
        #expect(try await !store.requeue(id: 9999, at: at(80)))
        #expect(try await store.nextDueTime(service: "a", ordered: false) == nil)
    }

    @Test(arguments: Kind.allCases)
    func requeueAllDeadAndDepth(kind: Kind) async throws {
        let (store, cleanup) = try await makeStore(kind)
        defer { cleanup() }
        for index in 0..<4 {
            _ = try await store.enqueue(event("e\(index)"), services: ["a"], at: t0, dedupSince: at(-1))
        }
        for job in try await store.claimDue(service: "a", now: t0, limit: 3, lease: .seconds(30)) {
            try await store.finish(
                deliveryID: job.deliveryID, leasedUntil: job.leaseUntil, attempt: .init(attempt: 1, at: t0, statusCode: 410, error: nil, durationMilliseconds: 1), next: .dead)
        }
        let depth = try await store.depth()
        #expect(depth.first { $0.status == .dead }?.count == 3)
        #expect(depth.first { $0.status == .pending }?.count == 1)
        #expect(depth.first { $0.status == .pending }?.oldestSince == t0)
        let last = try #require(try await store.claimDue(service: "a", now: t0, limit: 1, lease: .seconds(30)).first)
        try await store.finish(
            deliveryID: last.deliveryID, leasedUntil: last.leaseUntil, attempt: .init(attempt: 1, at: t0, statusCode: 200, error: nil, durationMilliseconds: 1), next: .delivered)
        #expect(try await store.requeue(DeliveryFilter(statuses: [.dead]), at: at(5), dryRun: true).selected == 3)
        #expect(try await store.requeue(DeliveryFilter(statuses: [.dead]), at: at(5), dryRun: false).selected == 3)
        let requeued = try await store.deliveries(status: .pending, limit: 10)
        #expect(requeued.count == 3)
        // Made pending again by an operator, they have waited since then, not since their creation (a
        // retry of last week's dead deliveries paged "undelivered for a week"); "retry now" of one
        // already pending changes nothing.
        #expect(try await store.depth().first { $0.status == .pending }?.oldestSince == at(5))
        #expect(try await store.requeue(id: requeued[0].id, at: at(9)))
        #expect(try await store.depth().first { $0.status == .pending }?.oldestSince == at(5))
    }

    @Test(arguments: Kind.allCases)
    func theOutboxCountsFollowEveryChangeOfADeliverysState(kind: Kind) async throws {
        let (store, cleanup) = try await makeStore(kind)
        defer { cleanup() }
        // The outbox gauges must say what a listing of the deliveries says, whatever changed them.
        func expectCountsMatchTheListing(_ step: Comment) async throws {
            var listed: [String: Int] = [:]
            for delivery in try await store.deliveries(status: nil, limit: 100) { listed["\(delivery.service) \(delivery.status)", default: 0] += 1 }
            var counted: [String: Int] = [:]
            for row in try await store.depth() where row.count > 0 { counted["\(row.service) \(row.status)"] = row.count }
            #expect(counted == listed, step)
        }
        func settle(_ service: String, limit: Int, now: UnixTime, code: Int, next: NextStep) async throws {
            for job in try await store.claimDue(service: service, now: now, limit: limit, lease: .seconds(30)) {
                let attempt = AttemptRecord(attempt: 1, at: now, statusCode: code, error: nil, durationMilliseconds: 1)
                try await store.finish(deliveryID: job.deliveryID, leasedUntil: job.leaseUntil, attempt: attempt, next: next)
            }
        }
        for index in 0..<6 {
            _ = try await store.enqueue(event("e\(index)", verification: "ver_\(index)"), services: ["a", "b"], at: t0, dedupSince: at(-1))
        }
        try await settle("a", limit: 4, now: t0, code: 200, next: .delivered)
        try await settle("b", limit: 3, now: t0, code: 410, next: .dead)
        try await expectCountsMatchTheListing("delivered and dead")
        #expect(try await store.requeue(DeliveryFilter(statuses: [.dead]), at: at(1), dryRun: false).selected == 3)
        try await expectCountsMatchTheListing("the dead ones re-queued")
        #expect(try await store.requeue(DeliveryFilter(statuses: [.delivered], verificationID: "ver_1"), at: at(2), dryRun: false).selected == 1)
        try await expectCountsMatchTheListing("a delivered one re-queued")
        let dead = try #require(try await store.deliveries(status: .pending, limit: 10).first { $0.service == "b" })
        #expect(try await store.requeue(id: dead.id, at: at(2)))
        try await expectCountsMatchTheListing("a pending one made due")
        try await settle("a", limit: 10, now: at(3), code: 200, next: .delivered)
        try await settle("b", limit: 2, now: at(3), code: 410, next: .dead)
        try await expectCountsMatchTheListing("settled again")
        // ver_3's event has a delivered delivery (to a) and a dead one (to b).
        #expect(try await store.deliveries(status: .dead, limit: 10).map(\.eventID).sorted() == ["e3", "e4"])
        _ = try await store.erase(verificationIDs: ["ver_3"], eventIDs: [], quarantineIDs: [], mentions: [])
        try await expectCountsMatchTheListing("erased")
        #expect(try await store.prune(deliveredBefore: at(100), seenBefore: at(-100), limit: 1000).deliveries == 5)
        try await expectCountsMatchTheListing("pruned")
        #expect(try await store.depth().filter { $0.count > 0 }.map { "\($0.service) \($0.status) \($0.count)" }.sorted() == ["b dead 1", "b pending 4"])
    }

    @Test func anUpgradedSQLiteStoreCountsTheDeliveriesItAlreadyHeld() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let path = directory + "/store.sqlite"
        let store = try SQLiteStore(path: path, protection: .sealedForTests)
        for index in 0..<3 {
            _ = try await store.enqueue(event("e\(index)"), services: ["a"], at: t0, dedupSince: at(-1))
        }
        for (index, job) in try await store.claimDue(service: "a", now: t0, limit: 2, lease: .seconds(30)).enumerated() {
            let attempt = AttemptRecord(attempt: 1, at: t0, statusCode: 200, error: nil, durationMilliseconds: 1)
            try await store.finish(deliveryID: job.deliveryID, leasedUntil: job.leaseUntil, attempt: attempt, next: index == 0 ? .delivered : .dead)
        }
        store.close()
        // The store as the version before the counts left it.
        let before = SQLiteStore.migrations.count - 1
        let downgrade = try await runTool(
            "/usr/bin/sqlite3",
            [
                path,
                "DROP TRIGGER delivery_counts_delete; DROP TRIGGER delivery_counts_update; DROP TABLE delivery_counts; PRAGMA user_version=\(before);",
            ])
        #expect(downgrade.status == 0, "\(downgrade.stderr)")
        let upgraded = try SQLiteStore(path: path, protection: .sealedForTests)
        defer { upgraded.close() }
        let counts = try await upgraded.depth().map { "\($0.status) \($0.count)" }.sorted()
        #expect(counts == ["dead 1", "delivered 1", "pending 1"])
    }

    @Test(arguments: Kind.allCases)
    func pruningRemovesOnlyWhatIsFinishedAndOld(kind: Kind) async throws {
        let (store, cleanup) = try await makeStore(kind)
        defer { cleanup() }
        _ = try await store.enqueue(event("old"), services: ["a"], at: t0, dedupSince: at(-1))
        _ = try await store.enqueue(event("pending"), services: ["a"], at: t0, dedupSince: at(-1))
        let job = try #require(try await store.claimDue(service: "a", now: t0, limit: 1, lease: .seconds(30)).first)
        try await store.finish(
            deliveryID: job.deliveryID, leasedUntil: job.leaseUntil, attempt: .init(attempt: 1, at: t0, statusCode: 200, error: nil, durationMilliseconds: 1), next: .delivered)
        try await store.quarantine(.init(receivedAt: t0, reason: "bad", body: [1], headers: [:], signatureVerified: true))
        // In batches: no call deletes more than `limit` rows of a table, and says when there may be more.
        let first = try await store.prune(deliveredBefore: at(1), seenBefore: at(1), limit: 1)
        #expect(first == PruneResult(deliveries: 1, seenIDs: 1, more: true))
        let rest = try await store.prune(deliveredBefore: at(1), seenBefore: at(1), limit: 1000)
        #expect(rest == PruneResult(deliveries: 0, seenIDs: 1, more: false))
        #expect(try await store.deliveries(status: nil, limit: 10).map(\.eventID) == ["pending"])
        #expect(try await store.quarantined(limit: 10).isEmpty)
    }

    @Test(arguments: Kind.allCases)
    func pruningDeletesAnEventWithItsLastDeliveryOnly(kind: Kind) async throws {
        let (store, cleanup) = try await makeStore(kind)
        defer { cleanup() }
        _ = try await store.enqueue(event("gone"), services: ["a"], at: t0, dedupSince: at(-1))
        _ = try await store.enqueue(event("shared"), services: ["a", "b"], at: t0, dedupSince: at(-1))
        for job in try await store.claimDue(service: "a", now: t0, limit: 10, lease: .seconds(30)) {
            let done = AttemptRecord(attempt: 1, at: t0, statusCode: 200, error: nil, durationMilliseconds: 1)
            try await store.finish(deliveryID: job.deliveryID, leasedUntil: job.leaseUntil, attempt: done, next: .delivered)
        }
        #expect(try await store.prune(deliveredBefore: at(1), seenBefore: at(-100), limit: 1000).deliveries == 2)
        let kept = try await store.keptEvents(after: 0, limit: 10).bodies.compactMap { body -> String? in
            guard case .event(let id, _) = body.owner else { return nil }
            return id
        }
        #expect(kept == ["shared"])
        #expect(try await store.claimDue(service: "b", now: t0, limit: 10, lease: .seconds(30)).map(\.event.id) == ["shared"])
    }

    @Test(arguments: Kind.allCases)
    func originsAndQuarantineAreKept(kind: Kind) async throws {
        let (store, cleanup) = try await makeStore(kind)
        defer { cleanup() }
        try await store.recordOrigin(verificationID: "ver_1", service: "a", at: t0)
        // A second service's record never replaces the first's: with onlyOwnVerifications it would take
        // the verification, its events and its calls through the proxy, from the service that created it.
        try await store.recordOrigin(verificationID: "ver_1", service: "b", at: at(1))
        #expect(try await store.origin(ofVerification: "ver_1") == "a")
        #expect(try await store.origin(ofVerification: "ver_2") == nil)
        try await store.quarantine(
            .init(receivedAt: t0, reason: "not an object", body: Array("[]".utf8), headers: ["X-Signature": "ab"], signatureVerified: true))
        let kept = try #require(try await store.quarantined(limit: 5).first)
        #expect(kept.body == Array("[]".utf8))
        #expect(kept.headers == ["X-Signature": "ab"])
        #expect(kept.reason == "not an object")
        try await store.checkWritable(at: t0)
    }

    @Test func sqliteSurvivesReopening() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let path = directory + "/store.sqlite"
        let first = try SQLiteStore(path: path, protection: .sealedForTests)
        let stored = try event("e1")
        _ = try await first.enqueue(stored, services: ["a"], at: t0, dedupSince: at(-1))
        first.close()
        let second = try SQLiteStore(path: path, protection: .sealedForTests)
        defer { second.close() }
        let job = try #require(try await second.claimDue(service: "a", now: t0, limit: 1, lease: .seconds(1)).first)
        #expect(job.event == stored)
    }

    @Test func sqliteCreatesTheStoresFolderFromItsPath() throws {
        #expect(folder(of: "/var/lib/kora/store.sqlite") == "/var/lib/kora")
        #expect(folder(of: "data//store.sqlite") == "data")
        #expect(folder(of: "/store.sqlite") == "/")
        #expect(folder(of: "store.sqlite") == "")
        #expect(folder(of: "data/") == "")
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let store = try SQLiteStore(path: directory + "/a/b/store.sqlite", protection: .sealedForTests)
        store.close()
        #expect(FileManager.default.fileExists(atPath: directory + "/a/b/store.sqlite"))
    }

    @Test func sqliteIsClosedEvenWhenItsServiceIsCancelled() async throws {
        // A service group cancels its services when one fails: the store must still finish and close.
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        var storage = StorageConfiguration()
        storage.sqlitePath = directory + "/store.sqlite"
        let opened = try storage.open(logger: quietLogger)
        _ = try await opened.store.enqueue(try event("e1"), services: ["a"], at: t0, dedupSince: at(-1))
        let running = Task { try await opened.service.run() }
        running.cancel()
        try await running.value
        await #expect(throws: SQLiteError.self) { try await opened.store.delivery(id: 1) }
        // Closed whole: the last connection's close checkpointed the WAL and removed it.
        #expect(!FileManager.default.fileExists(atPath: storage.sqlitePath + "-wal"))
    }

    @Test(arguments: Kind.allCases)
    func aDeathIsAnnouncedWithItsResultSoThatNoErasureComesBetween(kind: Kind) async throws {
        // The announcement was stored after the result, in a transaction of its own: an erasure of
        // the verification in between left a sidecar.delivery.dead event about it, then delivered.
        let (store, cleanup) = try await makeStore(kind)
        defer { cleanup() }
        let dead = AttemptRecord(attempt: 1, at: at(5), statusCode: 410, error: nil, durationMilliseconds: 1)
        func announcement(about verification: String) throws -> Announcement {
            var event = try event("sdc_" + RandomID.make(), verification: verification)
            event.type = "sidecar.delivery.dead"
            return Announcement(event: event, services: ["alerts"])
        }
        func alerts() async throws -> [DeliverySummary] {
            try await store.deliveries(DeliveryQuery(filter: DeliveryFilter(statuses: [], service: "alerts"), limit: 10))
        }
        // Erased while it was being sent: nothing is recorded, and nothing announced.
        _ = try await store.enqueue(event("e1", verification: "ver_erased"), services: ["a"], at: t0, dedupSince: at(-1))
        let first = try #require(try await store.claimDue(service: "a", now: at(1), limit: 1, lease: .seconds(30)).first)
        _ = try await store.erase(verificationIDs: ["ver_erased"], eventIDs: [], quarantineIDs: [], mentions: [])
        #expect(try await !store.finish(
            deliveryID: first.deliveryID, leasedUntil: first.leaseUntil, attempt: dead, next: .dead, announcing: announcement(about: "ver_erased")))
        #expect(try await alerts().isEmpty)
        // Recorded: announced with it, and an erasure afterwards takes both.
        _ = try await store.enqueue(event("e2", verification: "ver_later"), services: ["a"], at: t0, dedupSince: at(-1))
        let second = try #require(try await store.claimDue(service: "a", now: at(1), limit: 1, lease: .seconds(30)).first)
        #expect(try await store.finish(
            deliveryID: second.deliveryID, leasedUntil: second.leaseUntil, attempt: dead, next: .dead, announcing: announcement(about: "ver_later")))
        #expect(try await alerts().map(\.eventType) == ["sidecar.delivery.dead"])
        _ = try await store.erase(verificationIDs: ["ver_later"], eventIDs: [], quarantineIDs: [], mentions: [])
        #expect(try await alerts().isEmpty)
    }

    @Test(arguments: Kind.allCases)
    func anIdIsNeverGivenTwiceEvenOnceItsRowIsGone(kind: Kind) async throws {
        // SQLite gave the newest row's id again once that row was erased or pruned: an alert's
        // "delivery 2" then named another person's delivery.
        let (store, cleanup) = try await makeStore(kind)
        defer { cleanup() }
        #expect(try await store.enqueue(event("e1", verification: "ver_gone"), services: ["a"], at: t0, dedupSince: at(-1)) == .accepted)
        try await store.quarantine(.init(receivedAt: t0, reason: "bad", body: [1], headers: [:], signatureVerified: true))
        let delivery = try #require(try await store.deliveries(DeliveryQuery(limit: 10)).first?.id)
        let quarantined = try #require(try await store.quarantined(limit: 10).first?.id)
        _ = try await store.erase(verificationIDs: ["ver_gone"], eventIDs: [], quarantineIDs: [quarantined], mentions: [])
        #expect(try await store.deliveries(DeliveryQuery(limit: 10)).isEmpty)
        #expect(try await store.enqueue(event("e2"), services: ["a"], at: at(1), dedupSince: at(-1)) == .accepted)
        try await store.quarantine(.init(receivedAt: at(1), reason: "bad", body: [2], headers: [:], signatureVerified: true))
        #expect(try await store.deliveries(DeliveryQuery(limit: 10)).map(\.id).allSatisfy { $0 > delivery })
        #expect(try await store.quarantined(limit: 10).map(\.id).allSatisfy { $0 > quarantined })
        #expect(try await store.delivery(id: delivery) == nil)
    }

    @Test func aWallClockThatStepsAheadDeletesNothingUntilTheNextPassJudgesIt() async throws {
        // A week ahead (a machine resumed, a clock set wrong), one pass deleted every id that tells a
        // duplicate, every unrouted event and every dead delivery's body.
        let store = InMemoryStore()
        let ahead = NIOLockedValueBox<Int64>(0)
        let readings = NIOLockedValueBox(0)
        let clock: @Sendable () -> UnixTime = {
            readings.withLockedValue { $0 += 1 }
            return UnixTime(milliseconds: UnixTime.now().milliseconds + ahead.withLockedValue { $0 })
        }
        #expect(try await store.enqueue(event("u1"), services: [], at: .now(), dedupSince: UnixTime.now().adding(.seconds(-3600))) == .accepted)
        let logs = TestLogs()
        let housekeeping = Housekeeping(
            store: store, retention: .seconds(3600), payloadRetention: .seconds(86_400), deadRetention: .seconds(86_400),
            logger: logs.logger(), clock: clock, passEvery: .milliseconds(500))
        let running = Task { try await housekeeping.run() }
        defer { running.cancel() }
        // Once it has read the clock at its start (the time its first pass is judged against), a step.
        try await waitUntil("housekeeping to start") { readings.withLockedValue { $0 } > 0 }
        ahead.withLockedValue { $0 = 7 * 86_400_000 }
        try await waitUntil("a pass to doubt the clock") { logs.all.contains { $0.contains("The wall clock moved ahead") } }
        #expect(try await store.unroutedCount() == 1)
        // The clock stays where it is: the next pass takes it, and the event is past its window.
        try await waitUntil("the next pass to prune") { try await store.unroutedCount() == 0 }
    }

    @Test func aSecondServeCannotOpenTheSQLiteStoreTheFirstServes() async throws {
        // Each start releases the store's leases: a second process would send again what the first
        // has in flight.
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        var storage = StorageConfiguration()
        storage.sqlitePath = directory + "/store.sqlite"
        let first = try storage.open(logger: quietLogger)
        #expect {
            try storage.open(logger: quietLogger)
        } throws: { error in
            "\(error)" == "The store \(storage.sqlitePath) (storage.sqlitePath) is in use by another kora-sidecar serve (process \(getpid())): "
                + "stop it first, or give each its own storage.sqlitePath (replicas share a store through storage.postgresURL)."
        }
        // One-shot commands run beside it.
        #expect(try await storage.withStore(logger: quietLogger) { try await $0.delivery(id: 1) } == nil)
        // Once the first has stopped, the store is free.
        try await stop(first.service)
        try await stop(try storage.open(logger: quietLogger).service)
    }

    @Test func sqliteGroupCommitsConcurrentWrites() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let store = try SQLiteStore(path: directory + "/store.sqlite", protection: .sealedForTests)
        defer { store.close() }
        let events = try (0..<500).map { try event("bulk\($0)") }
        try await withThrowingTaskGroup(of: EnqueueResult.self) { group in
            for event in events {
                group.addTask { try await store.enqueue(event, services: ["a"], at: self.t0, dedupSince: self.at(-1)) }
            }
            for try await result in group { #expect(result == .accepted) }
        }
        #expect(try await store.depth().first?.count == 500)
    }

    @Test func sqliteBindsTextWithItsLength() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let database = try SQLiteDatabase(path: directory + "/store.sqlite", migrations: SQLiteStore.migrations, oldestReader: SQLiteStore.oldestReader)
        defer { database.close() }
        // Bound as a C string, text ended at its NUL: "ver_1\0x" was "ver_1", and an erasure of the
        // one erased the other.
        let row = try await database.read { db in
            try db.query("SELECT length(CAST(?1 AS BLOB)), ?1 = 'ver_1', typeof(?2), length(?3)", [.text("ver_1\u{0}x"), .text(""), .text("žluť")]).map {
                [$0.int(0), $0.int(1), $0.string(2) == "text" ? 1 : 0, $0.int(3)]
            }
        }
        #expect(row == [[7, 0, 1, 4]])
    }

    @Test func sqliteReadsDoNotWaitForAnOpenWriteTransaction() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let database = try SQLiteDatabase(path: directory + "/store.sqlite", migrations: SQLiteStore.migrations, oldestReader: SQLiteStore.oldestReader)
        defer { database.close() }
        let ids: @Sendable (SQLiteConnection) throws -> [String] = { db in
            try db.query("SELECT event_id FROM seen_events ORDER BY event_id").map { $0.string(0) }
        }
        try await database.write { db in try db.query("INSERT INTO seen_events VALUES('committed', 1)") }
        let entered = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        let writing = Task {
            try await database.write { db in
                try db.query("INSERT INTO seen_events VALUES('uncommitted', 1)")
                entered.signal()
                // A liveness bound: a read stuck behind this transaction fails the test instead of hanging it.
                _ = release.wait(timeout: .now() + .seconds(10 * Sanitizer.slowdown))
            }
        }
        #expect(await offPool { entered.wait(timeout: .now() + .seconds(10 * Sanitizer.slowdown)) } == .success)
        // The writer holds its transaction open; the reader answers from the last commit.
        #expect(try await database.read(ids) == ["committed"])
        release.signal()
        try await writing.value
        #expect(try await database.read(ids) == ["committed", "uncommitted"])
        await #expect(throws: SQLiteError.self) {
            try await database.read { db in try db.query("INSERT INTO seen_events VALUES('from the reader', 1)") }
        }
    }

    @Test func sqliteReadsDoNotWaitForAScanOfAWholeTable() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let database = try SQLiteDatabase(path: directory + "/store.sqlite", migrations: SQLiteStore.migrations, oldestReader: SQLiteStore.oldestReader)
        defer { database.close() }
        try await database.write { db in try db.query("INSERT INTO seen_events VALUES('committed', 1)") }
        let entered = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        let scanEnded = NIOLockedValueBox(false)
        // The metrics' counts, scanning a table of millions of rows for seconds.
        let scanning = Task {
            try await database.scan { _ in
                entered.signal()
                _ = release.wait(timeout: .now() + .seconds(10 * Sanitizer.slowdown))
                scanEnded.withLockedValue { $0 = true }
            }
        }
        #expect(await offPool { entered.wait(timeout: .now() + .seconds(10 * Sanitizer.slowdown)) } == .success)
        // A webhook's read meanwhile is answered while the scan goes on, not once it ended.
        #expect(try await database.read { db in try db.query("SELECT event_id FROM seen_events").map { $0.string(0) } } == ["committed"])
        #expect(!scanEnded.withLockedValue { $0 })
        release.signal()
        try await scanning.value
    }

    /// Three writes run in one batch (one transaction) on a fresh database, the middle one given
    /// by `middle`: what each returned, and the ids committed.
    func writesInOneBatch(
        middle: @escaping @Sendable (SQLiteConnection) throws -> Void
    ) async throws -> (results: [Bool], ids: [String]) {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let database = try SQLiteDatabase(path: directory + "/store.sqlite", migrations: SQLiteStore.migrations, oldestReader: SQLiteStore.oldestReader)
        defer { database.close() }
        // The writer is held in a first write while the three queue behind it, in order.
        let entered = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        let holding = Task {
            try await database.write { _ in
                entered.signal()
                _ = release.wait(timeout: .now() + .seconds(10 * Sanitizer.slowdown))
            }
        }
        #expect(await offPool { entered.wait(timeout: .now() + .seconds(10 * Sanitizer.slowdown)) } == .success)
        let bodies: [@Sendable (SQLiteConnection) throws -> Void] = [
            { db in try db.query("INSERT INTO seen_events VALUES('first', 1)") },
            middle,
            { db in try db.query("INSERT INTO seen_events VALUES('last', 1)") },
        ]
        var writes: [Task<Bool, Never>] = []
        for body in bodies {
            writes.append(Task { (try? await database.write(body)) != nil })
            let queued = writes.count
            try await waitUntil("write \(queued) queued") { database.queuedWrites == queued }
        }
        release.signal()
        try await holding.value
        var results: [Bool] = []
        for write in writes { results.append(await write.value) }
        let ids = try await database.read { db in try db.query("SELECT event_id FROM seen_events ORDER BY event_id").map { $0.string(0) } }
        return (results, ids)
    }

    @Test func aFailingWriteUndoesOnlyItselfInItsBatch() async throws {
        let (results, ids) = try await writesInOneBatch { db in
            try db.query("INSERT INTO seen_events VALUES('middle', 1)")
            try db.query("INSERT INTO seen_events VALUES('middle', 2)")  // a constraint failure
        }
        #expect(results == [true, false, true])
        #expect(ids == ["first", "last"])
    }

    /// After a full disk or an I/O error SQLite rolls the whole transaction back (here, the write
    /// does it itself): no write of the batch may then report success, nor commit unreported.
    @Test func aWriteThatLosesTheTransactionFailsEveryWriteOfItsBatch() async throws {
        let (results, ids) = try await writesInOneBatch { db in
            try db.query("INSERT INTO seen_events VALUES('middle', 1)")
            try db.execute("ROLLBACK")
            throw SQLiteError(code: 13, message: "database or disk is full")
        }
        #expect(results == [false, false, false])
        #expect(ids == [])
    }

    /// A lease commits without waiting for its fsync; every write after it that must be durable
    /// commits with it again (`PRAGMA synchronous`: 1 NORMAL, 2 FULL).
    @Test func onlyWritesThatNeedNotBeDurableSkipTheSync() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let database = try SQLiteDatabase(path: directory + "/store.sqlite", migrations: SQLiteStore.migrations, oldestReader: SQLiteStore.oldestReader)
        defer { database.close() }
        let synchronous: @Sendable (SQLiteConnection) throws -> Int64? = { try $0.query("PRAGMA synchronous").first?.int(0) }
        #expect(try await database.write(synchronous) == 2)
        #expect(try await database.write(durable: false, synchronous) == 1)
        #expect(try await database.write(durable: false, synchronous) == 1)
        #expect(try await database.write(synchronous) == 2)
        // Each setting's statement, prepared once, is run again.
        #expect(try await database.write(durable: false, synchronous) == 1)
        #expect(try await database.write(synchronous) == 2)
    }

    /// A running PostgreSQL store on `url` (a replica), with what stops it.
    func postgresReplica(_ url: String) async throws -> (store: PostgresStore, stop: @Sendable () -> Void) {
        let store = try PostgresStore(url: Secret(url), logger: Logger(label: "test"), operationTimeout: .seconds(5) * Sanitizer.slowdown, protection: .sealedForTests)
        let running = Task { await store.run() }
        try await store.waitUntilMigrated(timeout: .seconds(60))
        return (store, { running.cancel() })
    }

    @Test func postgresReplicasStartingTogetherMigrateOnceAndNeverClaimTheSameDelivery() async throws {
        let url = try await PostgresServer.shared().createDatabase()
        // Four replicas start at the same moment on an empty database.
        let replicas = try await withThrowingTaskGroup(of: (store: PostgresStore, stop: @Sendable () -> Void).self) { group in
            for _ in 0..<4 { group.addTask { try await self.postgresReplica(url) } }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        defer { replicas.forEach { $0.stop() } }
        for index in 0..<200 {
            _ = try await replicas[index % 4].store.enqueue(event("r\(index)"), services: ["a"], at: t0, dedupSince: at(-1))
        }
        let claimed = try await withThrowingTaskGroup(of: [Int64].self) { group in
            for replica in replicas {
                group.addTask {
                    var mine: [Int64] = []
                    while case let jobs = try await replica.store.claimDue(service: "a", now: self.at(1), limit: 7, lease: .seconds(60)), !jobs.isEmpty {
                        mine += jobs.map(\.deliveryID)
                    }
                    return mine
                }
            }
            return try await group.reduce(into: [[Int64]]()) { $0.append($1) }
        }
        #expect(claimed.joined().count == 200)
        #expect(Set(claimed.joined()).count == 200, "a delivery was leased to two replicas")
    }

    @Test func postgresDeDuplicationIsAtomicAcrossReplicas() async throws {
        let url = try await PostgresServer.shared().createDatabase()
        let (first, stopFirst) = try await postgresReplica(url)
        let (second, stopSecond) = try await postgresReplica(url)
        defer { stopFirst(); stopSecond() }
        for index in 0..<50 {
            let copy = try event("same\(index)")
            async let a = first.enqueue(copy, services: ["a"], at: t0, dedupSince: at(-1))
            async let b = second.enqueue(copy, services: ["a"], at: t0, dedupSince: at(-1))
            let results = try await [a, b]
            #expect(results.sorted { "\($0)" < "\($1)" } == [.accepted, .duplicate], "\(results)")
        }
        #expect(try await first.depth().first?.count == 50)
    }

    @Test func aStoreFromANewerVersionOpensOnlyWhereItSaysItCan() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let path = directory + "/store.sqlite"
        try SQLiteStore(path: path, protection: .sealedForTests).close()
        let newer = SQLiteStore.migrations.count + 1
        // A newer version whose migration only added: this one still opens the store (a rollback).
        let additive = try await runTool("/usr/bin/sqlite3", [path, "PRAGMA user_version=\(newer); ALTER TABLE deliveries ADD COLUMN later TEXT;"])
        #expect(additive.status == 0, "\(additive.stderr)")
        let opened = try SQLiteStore(path: path, protection: .sealedForTests)
        #expect(try await opened.depth().isEmpty)
        opened.close()
        // One that changed what rows mean says so, and this one refuses the store.
        let result = try await runTool("/usr/bin/sqlite3", [path, "UPDATE schema_reader SET oldest = \(newer)"])
        #expect(result.status == 0, "\(result.stderr)")
        #expect {
            try SQLiteStore(path: path, protection: .sealedForTests)
        } throws: { error in
            "\(error)".contains("schema version \(newer) was written by a newer kora-sidecar (this one knows \(newer - 1); it needs \(newer))")
        }
    }

    @Test func processesOpeningOneNewSQLiteStoreAtOnceMigrateItOnce() throws {
        // `serve` starting while a `deliveries` command opens the same store: each migrates what it
        // finds, and the one that found the store unmigrated must not run a version again.
        for _ in 0..<5 {
            let directory = try temporaryDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            // An empty store already in WAL mode, held open as a running `serve` holds it.
            let held = try SQLiteConnection(path: directory + "/store.sqlite")
            defer { held.close() }
            #expect(try held.query("PRAGMA journal_mode=WAL").first?.string(0) == "wal")
            let failures = NIOLockedValueBox<[String]>([])
            DispatchQueue.concurrentPerform(iterations: 6) { _ in
                do { try SQLiteStore(path: directory + "/store.sqlite", protection: .sealedForTests).close() } catch {
                    failures.withLockedValue { $0.append("\(error)") }
                }
            }
            #expect(failures.withLockedValue { $0 } == [])
        }
    }

    @Test func aStoreThisUserCannotWriteIsOneSentenceSayingWhatToChange() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        var storage = StorageConfiguration()
        storage.sqlitePath = directory
        #expect { try storage.open(logger: quietLogger) } throws: { "\($0)".contains("cannot be opened: it is a folder; name a file in it") }
        // The container's user and a volume root owns: not SQLite's "unable to open database file".
        guard getuid() == 0 else { return }
        try FileManager.default.createDirectory(atPath: directory + "/data", withIntermediateDirectories: true)
        let binary = directory + "/kora-sidecar"
        try FileManager.default.copyItem(atPath: Binary.path, toPath: binary)
        let config = directory + "/config.json"
        try Data(
            #"{"webhooks": {"secrets": ["s"], "listen": {"host": "127.0.0.1", "port": 0}}, "internal": {"listen": {"host": "127.0.0.1", "port": 0}}, "storage": {"sqlitePath": "\#(directory)/data/store.sqlite"}}"#
                .utf8
        ).write(to: URL(fileURLWithPath: config))
        let run = try await runTool("/usr/bin/setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", binary, "serve", "--config", config])
        #expect(run.status == 1, "\(run)")
        #expect(run.stderr.contains("this user (uid 65534) may not create files in \(directory)/data: it belongs to uid 0 with mode 755; chown it"), "\(run)")
    }

    @Test func aCorruptSQLiteFileIsAClearError() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let path = directory + "/store.sqlite"
        try Data(repeating: 0x42, count: 4096).write(to: URL(fileURLWithPath: path))
        #expect(throws: SQLiteError.self) { try SQLiteStore(path: path, protection: .sealedForTests) }
    }
}
