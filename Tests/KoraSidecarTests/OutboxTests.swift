import Foundation
import Hummingbird
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

/// Queued delivery (SPEC §4.5): retries, dead letters, 410, independent services, the admin API.
@Suite("Queued delivery")
struct OutboxTests {
    /// Options with a fast retry schedule (no jitter) and the given store.
    func fast(_ store: any SidecarStore, schedule: [Int] = [20, 20, 20]) -> SidecarOptions {
        var options = SidecarOptions()
        options.store = store
        options.retryPolicy = RetryPolicy(schedule: schedule.map { .milliseconds($0) }, jitter: 0)
        return options
    }

    @Test func retriesUntilTheServiceTakesTheEvent() async throws {
        let receiver = Receiver { _, index in index < 2 ? .serviceUnavailable : .ok }
        let store = InMemoryStore()
        try await withReceiver(receiver) { (port: Int) async throws in
            let configuration = testConfiguration(services: [testService("app", target: .url("http://127.0.0.1:\(port)/e"))], mode: .queued)
            try await withSidecar(configuration, options: fast(store)) { (sidecar: RunningSidecar) async throws in
                #expect(try await sendSigned(TestEvent.body(eventID: "evt_retry"), to: sidecar).json == ["received": true])
                let attempts = try await receiver.waitFor(3)
                #expect(attempts.map { $0.header("X-Kora-Delivery-Attempt") } == ["1", "2", "3"])
                #expect(Set(attempts.map { $0.header("webhook-id") }) == ["evt_retry"])
                #expect(Set(attempts.map(\.body)).count == 1)
                try await waitUntil("the delivery recorded as delivered") {
                    try await store.deliveries(status: .delivered, limit: 5).count == 1
                }
                let detail = try #require(try await store.delivery(id: store.deliveries(status: nil, limit: 1)[0].id))
                #expect(detail.attempts.map(\.statusCode) == [503, 503, 200])
            }
        }
    }

    @Test func deadAfterTheLastAttemptThenRequeuedByAnOperator() async throws {
        let receiver = Receiver { _, index in index < 3 ? .internalServerError : .noContent }
        let store = InMemoryStore()
        try await withReceiver(receiver) { (port: Int) async throws in
            var configuration = testConfiguration(services: [testService("app", target: .url("http://127.0.0.1:\(port)/e"))], mode: .queued)
            configuration.internal.adminToken = Secret("admin-secret-token")
            try await withSidecar(configuration, options: fast(store, schedule: [10, 10])) { (sidecar: RunningSidecar) async throws in
                #expect(try await sendSigned(TestEvent.body(eventID: "evt_dead"), to: sidecar).status == 200)
                try await waitUntil("the delivery to die") { try await store.deliveries(status: .dead, limit: 5).count == 1 }
                #expect(receiver.count == 3)

                let unauthorized = try await get(sidecar.internalURL("/admin/deliveries?status=dead"))
                #expect(unauthorized.status == 401)
                #expect(unauthorized.code == "UNAUTHORIZED")
                let admin = [("Authorization", "Bearer admin-secret-token")]
                let listing = try await get(sidecar.internalURL("/admin/deliveries?status=dead"), headers: admin)
                guard case .array(let dead)? = listing.json?["deliveries"], let id = dead.first?["id"]?.text else {
                    Issue.record("no dead delivery listed: \(listing.body)")
                    return
                }
                #expect(dead.first?["lastStatusCode"] == .int(500))
                let retried = try await post(sidecar.internalURL("/admin/deliveries/\(id)/retry"), body: [], headers: admin)
                #expect(retried.status == 200)
                let delivered = try await receiver.waitFor(4)
                #expect(delivered.last?.header("X-Kora-Delivery-Attempt") == "4")
                try await waitUntil("the requeued delivery to succeed") { try await store.deliveries(status: .delivered, limit: 5).count == 1 }
                #expect(try await post(sidecar.internalURL("/admin/deliveries/999999/retry"), body: [], headers: admin).status == 404)
            }
        }
    }

    @Test func a410MarksTheDeliveryDeadAtOnce() async throws {
        let receiver = Receiver { _, _ in .gone }
        let store = InMemoryStore()
        try await withReceiver(receiver) { (port: Int) async throws in
            let configuration = testConfiguration(services: [testService("app", target: .url("http://127.0.0.1:\(port)/e"))], mode: .queued)
            try await withSidecar(configuration, options: fast(store)) { (sidecar: RunningSidecar) async throws in
                #expect(try await sendSigned(TestEvent.body(), to: sidecar).status == 200)
                try await waitUntil("the delivery to die") { try await store.deliveries(status: .dead, limit: 5).count == 1 }
                #expect(receiver.count == 1)
            }
        }
    }

    @Test func aHangingServiceNeverDelaysAHealthyOne() async throws {
        let gate = Gate()
        let stuck = Receiver.held(by: gate)
        let healthy = Receiver()
        let store = InMemoryStore()
        try await withReceiver(stuck) { (stuckPort: Int) async throws in
            try await withReceiver(healthy) { (healthyPort: Int) async throws in
                var stuckService = testService("stuck", target: .url("http://127.0.0.1:\(stuckPort)/e"))
                // Long enough that no attempt times out while the test holds the service.
                stuckService.deliver?.timeoutSeconds = 120
                var configuration = testConfiguration(
                    services: [
                        stuckService,
                        testService("healthy", target: .url("http://127.0.0.1:\(healthyPort)/e")),
                    ], mode: .queued)
                configuration.delivery.concurrency = 2
                try await withSidecar(configuration, options: fast(store)) { (sidecar: RunningSidecar) async throws in
                    for index in 0..<20 {
                        #expect(try await sendSigned(TestEvent.body(eventID: "evt_\(index)"), to: sidecar).status == 200)
                    }
                    // Every worker of "stuck" is blocked, yet "healthy" receives all twenty.
                    _ = try await healthy.waitFor(20)
                    #expect(stuck.count == 2)
                    gate.open()
                    _ = try await stuck.waitFor(20)
                }
            }
        }
    }

    @Test func onlyMatchingServicesGetADelivery() async throws {
        let receiver = Receiver()
        let store = InMemoryStore()
        try await withReceiver(receiver) { (port: Int) async throws in
            let configuration = testConfiguration(
                services: [testService("kyc", target: .url("http://127.0.0.1:\(port)/e"), events: ["verification.*"])], mode: .queued)
            try await withSidecar(configuration, options: fast(store)) { (sidecar: RunningSidecar) async throws in
                #expect(try await sendSigned(TestEvent.body(type: "fraud_alert.created"), to: sidecar).status == 200)
                #expect(try await sendSigned(TestEvent.body(type: "verification.verified"), to: sidecar).status == 200)
                _ = try await receiver.waitFor(1)
                #expect(try await store.deliveries(status: nil, limit: 10).count == 1)
            }
        }
    }

    @Test func retryPolicyFollowsTheScheduleWithJitter() {
        let policy = RetryPolicy(schedule: [.seconds(10), .seconds(60)], jitter: 0.2)
        let now = UnixTime(milliseconds: 0)
        let failed = AttemptResult(statusCode: 500, error: nil, durationMilliseconds: 1)
        for _ in 0..<50 {
            guard case .retry(let at) = policy.next(after: 1, result: failed, now: now) else {
                Issue.record("expected a retry")
                return
            }
            #expect((8000...12000).contains(at.milliseconds))
        }
        #expect(policy.next(after: 3, result: failed, now: now) == .dead)
        #expect(policy.next(after: 1, result: .init(statusCode: 410, error: nil, durationMilliseconds: 1), now: now) == .dead)
        #expect(policy.next(after: 1, result: .init(statusCode: 201, error: nil, durationMilliseconds: 1), now: now) == .delivered)
        #expect(policy.next(after: 1, result: .init(statusCode: nil, error: "timed out", durationMilliseconds: 1), now: now) != .delivered)
    }

    @Test func retryAfterPostponesAnAttemptButNeverBringsItForward() {
        // Every attempt counts: a service answering `Retry-After: 1` to each one ran through the
        // schedule's 29 hours in minutes, and its events went dead while it was deploying.
        let policy = RetryPolicy(schedule: [.seconds(10), .seconds(60)], jitter: 0)
        let now = UnixTime(milliseconds: 0)
        func next(after attempt: Int, retryAfter: Duration) -> NextStep {
            var result = AttemptResult(statusCode: 503, error: nil, durationMilliseconds: 1)
            result.retryAfter = retryAfter
            return policy.next(after: attempt, result: result, now: now)
        }
        #expect(next(after: 1, retryAfter: .seconds(1)) == .retry(at: UnixTime(milliseconds: 10_000)))
        #expect(next(after: 1, retryAfter: .seconds(30)) == .retry(at: UnixTime(milliseconds: 30_000)))
        #expect(next(after: 1, retryAfter: .seconds(3600)) == .retry(at: UnixTime(milliseconds: 60_000)))
        #expect(next(after: 2, retryAfter: .seconds(1)) == .retry(at: UnixTime(milliseconds: 60_000)))
        #expect(next(after: 3, retryAfter: .seconds(1)) == .dead)
    }
}
