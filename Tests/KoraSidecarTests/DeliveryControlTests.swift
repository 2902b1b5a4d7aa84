import Foundation
import Hummingbird
import Logging
import NIOConcurrencyHelpers
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

/// Delivery that respects the services: the events of one verification in order, through real
/// listeners, on SQLite and on PostgreSQL replicas.
@Suite("Delivery control")
struct DeliveryControlTests {
    enum Store: String, CaseIterable, Sendable {
        case sqlite, postgresReplicas
    }

    /// Two stores over one database for PostgreSQL (two replicas), one SQLite store otherwise.
    func stores(_ kind: Store) async throws -> [any SidecarStore] {
        switch kind {
        case .sqlite:
            return [try SQLiteStore(path: try temporaryDirectory() + "/store.sqlite", protection: .sealedForTests)]
        case .postgresReplicas:
            let url = Secret(try await PostgresServer.shared().createDatabase())
            var stores: [any SidecarStore] = []
            for _ in 0..<2 {
                let store = try PostgresStore(url: url, logger: Logger(label: "test"), operationTimeout: .seconds(5) * Sanitizer.slowdown, protection: .sealedForTests)
                Task { await store.run() }
                try await store.waitUntilMigrated(timeout: .seconds(60))
                stores.append(store)
            }
            return stores
        }
    }

    @Test(arguments: Store.allCases)
    func aVerificationsEventsArriveInOrderWhileOthersAreNotHeldUp(store kind: Store) async throws {
        // The first event of ver_ordered fails twice; its two later events must wait for it.
        let receiver = Receiver { delivery, _ in
            delivery.header("webhook-id") == "evt_first" && delivery.header("X-Kora-Delivery-Attempt") != "3" ? .serviceUnavailable : .ok
        }
        let stores = try await stores(kind)
        try await withReceiver(receiver) { (port: Int) async throws in
            let configuration = testConfiguration(services: [testService("app", target: .url("http://127.0.0.1:\(port)/e"))], mode: .queued)
            try await withReplicas(configuration, stores: stores) { sidecar in
                for id in ["evt_first", "evt_second", "evt_third"] {
                    let body = TestEvent.body(eventID: id, verificationID: "ver_ordered")
                    #expect(try await sendSigned(body, to: sidecar).status == 200)
                }
                #expect(try await sendSigned(TestEvent.body(eventID: "evt_other", verificationID: "ver_other"), to: sidecar).status == 200)
                _ = try await receiver.waitFor(6, timeout: .seconds(20))
                let arrivals = receiver.deliveries.map { $0.header("webhook-id") ?? "" }
                #expect(arrivals.filter { $0 != "evt_other" } == ["evt_first", "evt_first", "evt_first", "evt_second", "evt_third"])
                // The other verification went at once, before the first event's retries were over.
                #expect(arrivals.firstIndex(of: "evt_other")! < arrivals.lastIndex(of: "evt_first")!)
            }
        }
    }

    /// Runs one sidecar per store (replicas sharing a database) with a fast retry schedule; `body`
    /// sends to the first.
    func withReplicas(
        _ configuration: SidecarConfiguration, stores: [any SidecarStore], _ body: @Sendable @escaping (RunningSidecar) async throws -> Void
    ) async throws {
        var options = SidecarOptions()
        options.store = stores[0]
        // Slow enough that the other verification's event, sent just after, clearly goes first, even on
        // a loaded two-core machine with two replicas polling one PostgreSQL (600 ms was seen to be too little).
        options.retryPolicy = RetryPolicy(schedule: [.milliseconds(1500), .milliseconds(1500), .milliseconds(1500)], jitter: 0)
        guard stores.count > 1 else {
            try await withSidecar(configuration, options: options, body)
            return
        }
        var second = options
        second.store = stores[1]
        let first = options
        try await withSidecar(configuration, options: second) { _ in
            try await withSidecar(configuration, options: first, body)
        }
    }

    @Test func checkConfigValidatesTheDeliveryControlKeys() throws {
        let text = #"""
            {"webhooks": {"secrets": ["whsec_x"]}, "delivery": {"ordering": "random"},
             "services": [{"name": "app", "deliver": {"url": "http://127.0.0.1:1/e", "breaker": {"failures": 0, "after": 1}, "maxPerSecond": 0}}]}
            """#
        let error = try #require(throws: ConfigurationError.self) {
            try SidecarConfiguration.load(bytes: Array(text.utf8), source: "test", environment: [:])
        }
        let paths = error.problems.map(\.path)
        for path in ["$.delivery.ordering", "$.services[0].deliver.breaker.failures", "$.services[0].deliver.breaker.after", "$.services[0].deliver.maxPerSecond"] {
            #expect(paths.contains(path), "\(path) in \(error)")
        }
        let good = try SidecarConfiguration.load(
            bytes: Array(#"{"webhooks": {"secrets": ["whsec_x"]}, "delivery": {"ordering": "none"}, "services": [{"name": "a", "deliver": {"url": "http://h/e", "breaker": {"failures": 9}, "maxPerSecond": 20}}]}"#.utf8),
            source: "test", environment: [:])
        #expect(good.delivery.ordering == .none)
        #expect(good.services[0].deliver?.breakerFailures == 9)
        #expect(good.services[0].deliver?.maxPerSecond == 20)
        #expect(good.effectiveJSON["delivery"]?["ordering"] == "none")
    }

    // MARK: Replay by filter

    /// The real binary serving a receiver, until `body` has run and a SIGTERM stopped it cleanly.
    private func serving(_ body: @Sendable (_ receiver: Receiver, _ config: String, _ sidecar: RunningSidecar) async throws -> Void) async throws {
        let receiver = Receiver()
        try await withReceiver(receiver) { (port: Int) async throws in
            let config = try writeProcessConfig(directory: try temporaryDirectory(), receiverPort: port)
            let serve = try SidecarProcess(config: config)
            try await body(receiver, config, try await serve.running())
            serve.signal(SIGTERM)
            try await serve.expectCleanExit()
        }
    }

    @Test func operatorsReplayByFilterAndResendOneEventWhileServeRuns() async throws {
        try await serving { receiver, config, sidecar in
            for (id, type) in [("evt_r1", "verification.completed"), ("evt_r2", "fraud_alert.created"), ("evt_r3", "verification.completed")] {
                #expect(try await sendSigned(TestEvent.body(type: type, eventID: id), to: sidecar).status == 200)
            }
            _ = try await receiver.waitFor(3)
            try await waitUntil("three delivered") {
                try await Binary.run(["deliveries", "list", "--status", "delivered", "--config", config]).stdout.components(separatedBy: "evt_r").count == 4
            }
            let dry = try await Binary.run(["deliveries", "retry", "--status", "delivered", "--type", "verification.completed", "--dry-run", "--config", config])
            #expect(dry.stdout.contains("2 delivered deliveries would be queued again."), "\(dry.stdout)\(dry.stderr)")
            let none = try await Binary.run(["deliveries", "retry", "--status", "delivered", "--since", "1h", "--until", "2000-01-01", "--dry-run", "--config", config])
            #expect(none.stdout.contains("0 delivered deliveries would be queued again."), "\(none.stdout)\(none.stderr)")
            let admin = try await post(
                sidecar.internalURL("/admin/deliveries/retry?status=delivered&service=app&since=1h&dryRun=true"), body: [], headers: [])
            #expect(admin.json?["wouldRequeue"]?.text == "3")
            #expect(receiver.count == 3)

            let replay = try await Binary.run(["deliveries", "replay", "evt_r2", "--service", "app", "--config", config])
            #expect(replay.status == 0, "\(replay.stderr)")
            #expect(replay.stdout.contains("Event evt_r2 is queued again for 1 delivery."))
            let again = try await receiver.waitFor(4, timeout: .seconds(20))
            #expect(again[3].header("webhook-id") == "evt_r2")
            #expect(again[3].header("X-Kora-Delivery-Attempt") == "2")
            let missing = try await Binary.run(["deliveries", "replay", "evt_nowhere", "--config", config])
            #expect(missing.status == 1)
            #expect(missing.stderr.contains("Event evt_nowhere has no delivered or dead delivery"))
            let refused = try await post(sidecar.internalURL("/admin/deliveries/retry?status=delivered&since=yesterday"), body: [], headers: [])
            #expect(refused.status == 400)
            #expect(refused.code == "INVALID_TIME")
        }
    }

    @Test func aDryRunSaysTheBoundsThatSendExactlyWhatItCounted() async throws {
        // The console confirmed "Send 1 again" by asking again with the same filters: every event
        // delivered in between was sent again too.
        try await serving { receiver, config, sidecar in
            #expect(try await sendSigned(TestEvent.body(eventID: "evt_b1"), to: sidecar).status == 200)
            _ = try await receiver.waitFor(1)
            let query = "status=delivered&since=1h"
            try await waitUntil("delivered") {
                try await post(sidecar.internalURL("/admin/deliveries/retry?\(query)&dryRun=true"), body: [], headers: []).json?["wouldRequeue"]?.text == "1"
            }
            let dry = try await post(sidecar.internalURL("/admin/deliveries/retry?\(query)&dryRun=true"), body: [], headers: []).json
            let since = try #require(dry?["since"]?.text), until = try #require(dry?["until"]?.text)
            let cli = try await Binary.run(["deliveries", "retry", "--status", "delivered", "--since", "1h", "--dry-run", "--config", config])
            #expect(cli.stdout.contains("1 delivered deliveries would be queued again. To send exactly these, add --since "), "\(cli.stdout)")
            // Another event is delivered before the operator confirms.
            #expect(try await sendSigned(TestEvent.body(eventID: "evt_b2"), to: sidecar).status == 200)
            _ = try await receiver.waitFor(2)
            try await waitUntil("both delivered") {
                try await post(sidecar.internalURL("/admin/deliveries/retry?\(query)&dryRun=true"), body: [], headers: []).json?["wouldRequeue"]?.text == "2"
            }
            let confirmed = try await post(
                sidecar.internalURL("/admin/deliveries/retry?status=delivered&since=\(percentEncoded(since))&until=\(percentEncoded(until))"),
                body: [], headers: [])
            #expect(confirmed.json?["requeued"]?.text == "1")
            let again = try await receiver.waitFor(3)
            #expect(again[2].header("webhook-id") == "evt_b1")
        }
    }

    @Test func aReplayAskedTwiceSaysTheFirstIsStillQueued() async throws {
        // The service is down: the replayed delivery waits, pending, for its next attempt. A second
        // replay said the event had no such delivery, as if it were gone.
        let directory = try temporaryDirectory()
        let config = try writeProcessConfig(directory: directory, receiverPort: try freePort(), retrySchedule: ["1h"])
        let serve = try SidecarProcess(config: config)
        let sidecar = try await serve.running()
        #expect(try await sendSigned(TestEvent.body(eventID: "evt_q1"), to: sidecar).status == 200)
        try await waitUntil("the first attempt to fail") {
            try await get(sidecar.internalURL("/admin/deliveries?status=pending")).json?["deliveries"]?[0]?["attempts"]?.text == "1"
        }
        let replay = try await Binary.run(["deliveries", "replay", "evt_q1", "--config", config])
        #expect(replay.status == 0, "\(replay.stderr)")
        #expect(replay.stdout.contains("Event evt_q1 is already queued for 1 delivery, not yet sent; nothing more to do."), "\(replay.stdout)")
        let admin = try await post(sidecar.internalURL("/admin/events/evt_q1/replay"), body: [], headers: [])
        #expect(admin.status == 200)
        #expect(admin.json?["alreadyQueued"]?.text == "1")
        #expect(admin.json?["requeued"]?.text == "0")
        serve.signal(SIGTERM)
        try await serve.expectCleanExit()
    }

    // MARK: Circuit breaker

    @Test func aServiceThatRefusesEverythingIsPausedProbedAndResumed() async throws {
        let healthy = NIOLockedValueBox(false)
        let delivered = NIOLockedValueBox<Set<String>>([])
        let receiver = Receiver { delivery, _ in
            guard healthy.withLockedValue({ $0 }) else { return .internalServerError }
            delivered.withLockedValue { _ = $0.insert(delivery.header("webhook-id") ?? "") }
            return .ok
        }
        let logs = TestLogs()
        try await withReceiver(receiver) { (port: Int) async throws in
            var service = testService("app", target: .url("http://127.0.0.1:\(port)/e"))
            service.deliver?.breakerFailures = 3
            var configuration = testConfiguration(services: [service], mode: .queued)
            configuration.delivery.concurrency = 1
            var options = SidecarOptions()
            options.store = InMemoryStore()
            options.retryPolicy = RetryPolicy(schedule: Array(repeating: .milliseconds(20), count: 50), jitter: 0)
            options.breakerCooldown = .milliseconds(300)
            try await withSidecar(configuration, options: options, logs: logs) { sidecar in
                let started = ContinuousClock.now
                for index in 0..<5 { #expect(try await sendSigned(TestEvent.body(eventID: "evt_b\(index)"), to: sidecar).status == 200) }
                try await waitUntil("the service to be paused") { try await serviceState(sidecar) == "open" }
                // Paused after 3 failures, it gets one probe per cool-down (300 ms, then 600, 1200 …), nothing more.
                try await waitUntil("two probes") { receiver.count >= 5 }
                let elapsed = Double((ContinuousClock.now - started).milliseconds)
                #expect(receiver.count <= 3 + Int(elapsed / 300), "\(receiver.count) requests in \(elapsed) ms")
                let metrics = try await get(sidecar.internalURL("/metrics")).body
                #expect(metrics.contains(#"kora_sidecar_service_state{service="app",state="closed"} 0"#))

                healthy.withLockedValue { $0 = true }
                try await waitUntil("every event delivered", timeout: .seconds(20)) { delivered.withLockedValue { $0.count } == 5 }
                #expect(try await serviceState(sidecar) == "closed")
                #expect(logs.all.contains { $0.contains("Service paused after failed deliveries") })
                #expect(logs.all.contains { $0.contains("Service resumed") })
            }
        }
    }

    @Test(arguments: [(nil, true), (500, true), (503, true), (408, true), (429, true), (400, false), (404, false), (410, false), (204, false)])
    func onlyAnswersThatSayTheServiceIsUnwellCountTowardsAPause(status: Int?, unwell: Bool) {
        // A refusal of one event (400, 410) shows the service up: it must not pause it for everyone.
        #expect(AttemptResult(statusCode: status, error: nil, durationMilliseconds: 1).serviceFailed == unwell)
    }

    @Test func directModeAnswers503AtOnceWhileTheServiceIsPaused() async throws {
        let receiver = Receiver { _, _ in .internalServerError }
        try await withReceiver(receiver) { (port: Int) async throws in
            var service = testService("app", target: .url("http://127.0.0.1:\(port)/e"))
            service.deliver?.breakerFailures = 2
            var options = SidecarOptions()
            options.store = InMemoryStore()
            options.breakerCooldown = .seconds(60)
            try await withSidecar(testConfiguration(services: [service], mode: .direct), options: options) { sidecar in
                for _ in 0..<2 { #expect(try await sendSigned(TestEvent.body(), to: sidecar).status == 503) }
                let held = try await sendSigned(TestEvent.body(), to: sidecar)
                #expect(held.status == 503)
                #expect(held.body.contains("paused"))
                #expect(receiver.count == 2)
                let services = try await get(sidecar.internalURL("/admin/services")).json?["services"]
                #expect(services?[0]?["state"] == "open")
                #expect(services?[0]?["consecutiveFailures"]?.text == "2")
                // The metric says why each was answered 503: refused by the service, then held back.
                let metrics = try await get(sidecar.internalURL("/metrics")).body
                #expect(metrics.contains(#"kora_sidecar_webhooks_total{result="UNAVAILABLE",reason="service_refused"} 2"#))
                #expect(metrics.contains(#"kora_sidecar_webhooks_total{result="UNAVAILABLE",reason="service_held"} 1"#))
            }
        }
    }

    /// A service with a delivery rate whose breaker opened: the probe that its rate held back used
    /// to stay taken, and the service stayed paused until a restart.
    @Test(arguments: [DeliveryMode.direct, .queued])
    func aProbeHeldBackByTheRateIsNotLost(mode: DeliveryMode) async throws {
        let receiver = Receiver { _, index in index == 0 ? .internalServerError : .ok }
        try await withReceiver(receiver) { (port: Int) async throws in
            var service = testService("app", target: .url("http://127.0.0.1:\(port)/e"))
            service.deliver?.breakerFailures = 1
            service.deliver?.maxPerSecond = 1
            var configuration = testConfiguration(services: [service], mode: mode)
            configuration.delivery.concurrency = 4
            var options = SidecarOptions()
            options.store = InMemoryStore()
            options.retryPolicy = RetryPolicy(schedule: Array(repeating: .milliseconds(20), count: 50), jitter: 0)
            options.breakerCooldown = .milliseconds(50)
            try await withSidecar(configuration, options: options) { sidecar in
                let body = TestEvent.body()
                let first = try await sendSigned(body, to: sidecar).status
                #expect(first == (mode == .direct ? 503 : 200))
                // The cool-down ends long before the rate's next turn, a second after the first attempt.
                try await waitUntil("the service to take the event", timeout: .seconds(10)) {
                    if mode == .direct { _ = try await sendSigned(body, to: sidecar) }
                    return receiver.count >= 2
                }
                try await waitUntil("the breaker closed") { try await serviceState(sidecar) == "closed" }
            }
        }
    }

    @Test func anAttemptRecordedStaysRecordedWhenClaimingTheNextFails() async throws {
        // PostgreSQL records the attempt and claims the next delivery in two transactions: the store
        // failing between them must not make a recorded (dead) outcome look unrecorded.
        let store = InMemoryStore()
        let event = try EventNormalizer.normalize(body: TestEvent.body(eventID: "evt_1"), webhookID: nil, receivedAt: .now())
        #expect(try await store.enqueue(event, services: ["app"], at: .now(), dedupSince: .now().adding(.seconds(-60))) == .accepted)
        let job = try #require(try await store.claimDue(service: "app", now: .now(), limit: 1, lease: .seconds(30), ordered: false).first)
        store.failClaims(with: SQLiteError(code: 5, message: "database is locked"))
        let attempt = AttemptRecord(attempt: 1, at: .now(), statusCode: 400, error: nil, durationMilliseconds: 1)
        let finished = try await store.finishAndClaimNext(
            deliveryID: job.deliveryID, leasedUntil: job.leaseUntil, attempt: attempt, next: .dead, service: "app", now: .now(),
            lease: .seconds(30), ordered: false)
        #expect(finished.recorded && finished.next == nil)
        #expect(try await store.deliveries(status: .dead, limit: 10).map(\.id) == [job.deliveryID])
    }

    @Test func aBulkRetryLeavesTheDeliveriesOfAServiceNoLongerConfigured() async throws {
        let store = InMemoryStore()
        let event = try EventNormalizer.normalize(
            body: TestEvent.body(eventID: "evt_1"), webhookID: nil, receivedAt: .now(), originalHeaders: [])
        #expect(try await store.enqueue(event, services: ["app", "gone"], at: .now(), dedupSince: .now().adding(.seconds(-60))) == .accepted)
        for service in ["app", "gone"] {
            let job = try #require(try await store.claimDue(service: service, now: .now(), limit: 1, lease: .seconds(30), ordered: false).first)
            let attempt = AttemptRecord(attempt: 1, at: .now(), statusCode: 400, error: nil, durationMilliseconds: 1)
            #expect(try await store.finish(deliveryID: job.deliveryID, leasedUntil: job.leaseUntil, attempt: attempt, next: .dead))
        }
        // `gone` was removed from the configuration: nothing would ever send it again.
        let router = EventRouter(services: [DeliveryService(name: "app", deliver: testService("app", target: .url("http://127.0.0.1:9/e")).deliver!)], store: store)
        let bulk = try await OperatorActions.retry(try #require(.init(status: "dead")), store: store, router: router)
        #expect(bulk.selected == 1)
        #expect(try await store.deliveries(status: .dead, limit: 10).map(\.service) == ["gone"])
        // Named, it is the operator's call.
        let named = try await OperatorActions.retry(
            try #require(.init(status: "dead", filter: DeliveryFilter(statuses: [], service: "gone"))), store: store, router: router)
        #expect(named.selected == 1)
    }

    @Test func workersThatFindNothingDueSpendNoneOfTheRate() async throws {
        let receiver = Receiver()
        try await withReceiver(receiver) { (port: Int) async throws in
            var app = testService("app", target: .url("http://127.0.0.1:\(port)/e"))
            app.deliver?.maxPerSecond = 3
            let services = [DeliveryService(name: "app", deliver: app.deliver!)]
            let store = InMemoryStore()
            let rateLimits = ServiceRateLimits(services)
            let client = DeliveryClient()
            defer { client.shutdown() }
            let dispatcher = OutboxDispatcher(
                store: store, sender: EventSender(client: client, reportOnly: false), services: services, policy: RetryPolicy(schedule: [], jitter: 0),
                concurrency: 1, rateLimits: rateLimits, logger: Logger(label: "test"))
            let running = Task { try await dispatcher.run() }
            defer { running.cancel() }
            /// Rings the worker's bell and waits until it looked, found nothing due, and waits again.
            func lookWithNothingDue() async throws {
                let looks = store.nextDueLooks.load(ordering: .relaxed)
                dispatcher.notify(services: ["app"])
                try await waitUntil("the worker to find nothing due") { store.nextDueLooks.load(ordering: .relaxed) > looks }
            }
            for _ in 0..<3 { try await lookWithNothingDue() }
            let event = try EventNormalizer.normalize(body: TestEvent.body(), webhookID: nil, receivedAt: .now())
            _ = try await store.enqueue(event, services: ["app"], at: .now(), dedupSince: .now())
            dispatcher.notify(services: ["app"])
            try await waitUntil("the event delivered") { try await store.deliveries(DeliveryQuery(limit: 10)).map(\.status) == [.delivered] }
            try await lookWithNothingDue()
            // A second's worth is three tokens. The delivery took one; neither the looks nor the
            // worker's lease of a next delivery after it (none was due) kept one.
            let now = UnixTime.now()
            #expect(rateLimits["app"]?.take(now: now) == .zero)
            #expect(rateLimits["app"]?.take(now: now) == .zero)
            #expect(receiver.count == 1)
        }
    }

    @Test func aBreakerOpenedBeforeTheWallClockSteppedBackPausesNoLongerThanItsCoolDown() {
        let breaker = ServiceBreaker(service: "app", failures: 1, logger: Logger(label: "test"))
        let opened = UnixTime(milliseconds: 1_800_000_000_000)
        breaker.record(healthy: false, now: opened)
        #expect(breaker.permit(now: opened.adding(.seconds(10))) == .wait(until: opened.adding(.seconds(30))))
        // An hour back: the cool-down is 30 s from now at most, not the hour plus 30 s.
        #expect(breaker.permit(now: opened.adding(.seconds(-3600))) == .go)
    }

    @Test func aDeliveryCutOffByTheDrainTimeOutStaysPendingWithItsAttempts() async throws {
        let gate = Gate()
        let receiver = Receiver.held(by: gate)
        let store = InMemoryStore()
        try await withReceiver(receiver) { (port: Int) async throws in
            var service = testService("app", target: .url("http://127.0.0.1:\(port)/e"))
            // The drain, not the service's time-out, must cut the delivery off, however long a loaded
            // test process takes to stop the listeners before the dispatcher drains.
            service.deliver?.timeoutSeconds = 300
            var configuration = testConfiguration(services: [service], mode: .queued)
            configuration.delivery.drainTimeout = .milliseconds(100)
            var options = SidecarOptions()
            options.store = store
            // One attempt only: counted as failed, the cut-off delivery was dead after a restart.
            options.retryPolicy = RetryPolicy(schedule: [], jitter: 0)
            try await withSidecar(configuration, options: options) { sidecar in
                #expect(try await sendSigned(TestEvent.body(), to: sidecar).status == 200)
                _ = try await receiver.waitFor(1)
            }
            gate.open()
        }
        let deliveries = try await store.deliveries(DeliveryQuery(limit: 10))
        #expect(deliveries.map(\.status) == [.pending])
        #expect(deliveries.map(\.attempts) == [0])
    }

    // MARK: Operational events

    @Test func subscribersHearOfPausedServicesAndDeadDeliveries() async throws {
        let failing = Receiver { _, _ in .internalServerError }
        let operations = Receiver()
        try await withReceiver(failing) { (failingPort: Int) async throws in
            try await withReceiver(operations) { (operationsPort: Int) async throws in
                var app = testService("app", target: .url("http://127.0.0.1:\(failingPort)/e"))
                app.deliver?.breakerFailures = 2
                let ops = testService("ops", target: .url("http://127.0.0.1:\(operationsPort)/ops"), events: ["sidecar.*"])
                var options = SidecarOptions()
                options.store = InMemoryStore()
                options.retryPolicy = RetryPolicy(schedule: [.milliseconds(20), .milliseconds(20)], jitter: 0)
                options.breakerCooldown = .milliseconds(100)
                try await withSidecar(testConfiguration(services: [app, ops], mode: .queued), options: options) { sidecar in
                    #expect(try await sendSigned(TestEvent.body(eventID: "evt_doomed"), to: sidecar).status == 200)
                    try await waitUntil("the paused and dead notices", timeout: .seconds(20)) {
                        let types = Set(operations.deliveries.compactMap { $0.header("X-Kora-Event-Type") })
                        return types.isSuperset(of: ["sidecar.service.paused", "sidecar.delivery.dead"])
                    }
                    let notices = operations.deliveries
                    let dead = try #require(notices.first { $0.header("X-Kora-Event-Type") == "sidecar.delivery.dead" }?.json)
                    #expect(dead["data"]?["service"] == "app")
                    #expect(dead["data"]?["attempts"]?.text == "3")
                    #expect(dead["data"]?["event"]?["id"] == "evt_doomed")
                    let paused = try #require(notices.first { $0.header("X-Kora-Event-Type") == "sidecar.service.paused" }?.json)
                    #expect(paused["data"]?["service"] == "app")
                    #expect(notices.allSatisfy { $0.header("webhook-signature")?.hasPrefix("v1,") == true })
                    // `*` never matches the sidecar's own events: app only ever got Kora's.
                    #expect(failing.deliveries.allSatisfy { $0.header("X-Kora-Event-Type") == "verification.completed" })
                }
            }
        }
    }

    // MARK: Rate limit and Retry-After

    @Test func maxPerSecondCapsDeliveriesAcrossWorkers() async throws {
        let arrivals = NIOLockedValueBox<[ContinuousClock.Instant]>([])
        let receiver = Receiver { _, _ in
            arrivals.withLockedValue { $0.append(.now) }
            return .ok
        }
        try await withReceiver(receiver) { (port: Int) async throws in
            var service = testService("app", target: .url("http://127.0.0.1:\(port)/e"))
            service.deliver?.maxPerSecond = 5
            // Thirty deliveries are due before the sidecar starts: its sixteen workers would send them all at once.
            let count = 30
            let store = InMemoryStore()
            for _ in 0..<count {
                let event = try EventNormalizer.normalize(body: TestEvent.body(), webhookID: nil, receivedAt: .now())
                _ = try await store.enqueue(event, services: ["app"], at: .now(), dedupSince: .now())
            }
            var options = SidecarOptions()
            options.store = store
            let started = ContinuousClock.now
            try await withSidecar(testConfiguration(services: [service], mode: .queued), options: options) { _ in
                _ = try await receiver.waitFor(count, timeout: .seconds(60))
            }
            // A second's worth (five) may go at once, then five a second from the rate's start (after
            // `started`): the thirtieth cannot arrive before (30 - 5) / 5 = 5 s. A slow machine only makes
            // it later; without the cap all thirty arrive within moments. (50 ms: the rate's millisecond clock.)
            let last = try #require(arrivals.withLockedValue { $0.max() })
            #expect(last - started >= .seconds(5) - .milliseconds(50), "the last of \(count) deliveries arrived \(last - started) after the start")
        }
    }

    /// `Retry-After: 1` overrides the schedule's 50 ms. A date no server writes falls back to the
    /// schedule: its nine-digit year overflowed the date arithmetic and stopped the process, a crash
    /// loop, as the delivery stays pending across restarts.
    @Test(arguments: [("1", true), ("Sun, 06 Nov 999999999 08:49:37 GMT", false)])
    func aServiceAskingToWaitIsTriedAgainWhenItSaid(retryAfter: String, honoured: Bool) async throws {
        let arrivals = NIOLockedValueBox<[ContinuousClock.Instant]>([])
        try await withRetryAfterService(arrivals, retryAfter: retryAfter) { port in
            var options = SidecarOptions()
            options.store = InMemoryStore()
            options.retryPolicy = RetryPolicy(schedule: [.milliseconds(50), .seconds(5)], jitter: 0)
            let configuration = testConfiguration(services: [testService("app", target: .url("http://127.0.0.1:\(port)/e"))], mode: .queued)
            try await withSidecar(configuration, options: options) { sidecar in
                #expect(try await sendSigned(TestEvent.body(), to: sidecar).status == 200)
                try await waitUntil("a second attempt", timeout: .seconds(20)) { arrivals.withLockedValue { $0.count } >= 2 }
                let times = arrivals.withLockedValue { $0 }
                if honoured { #expect(times[1] - times[0] >= .milliseconds(900)) }
            }
        }
    }

    /// A service answering 429 with `Retry-After` the first time, then 200; records when requests came.
    func withRetryAfterService(
        _ arrivals: NIOLockedValueBox<[ContinuousClock.Instant]>, retryAfter: String, _ body: @Sendable (Int) async throws -> Void
    ) async throws {
        let router = Router()
        router.post("**") { _, _ -> Response in
            let count = arrivals.withLockedValue { list in
                list.append(.now)
                return list.count
            }
            return count == 1 ? Response(status: .tooManyRequests, headers: [.retryAfter: retryAfter]) : Response(status: .ok)
        }
        let bound = BoundPort()
        let app = Application(
            router: router, configuration: .init(address: .hostname("127.0.0.1", port: 0)),
            onServerRunning: { channel in await bound.hook(channel.localAddress) }, logger: quietLogger)
        try await withServices([app]) { try await body(try await bound.wait()) }
    }
}

/// The breaker state `/admin/services` shows for the first service.
private func serviceState(_ sidecar: RunningSidecar) async throws -> String? {
    try await get(sidecar.internalURL("/admin/services")).json?["services"]?[0]?["state"]?.text
}

extension JSONValue {
    /// The element at `index` of an array, if there is one.
    fileprivate subscript(index: Int) -> JSONValue? {
        guard case .array(let elements) = self, elements.indices.contains(index) else { return nil }
        return elements[index]
    }
}
