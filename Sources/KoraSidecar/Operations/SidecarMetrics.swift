import CoreMetrics
import KoraSidecarCore
import NIOConcurrencyHelpers
import Prometheus

/// The sidecar's metrics (SPEC §5.3), rendered in Prometheus text format on `/metrics`.
///
/// Labels are low cardinality: a result code, a service name from the configuration, a status
/// class; never an id, a URL or a value a caller chose.
package struct SidecarMetrics: Sendable {
    /// Where the metrics are kept; `/metrics` renders it.
    let registry: PrometheusCollectorRegistry
    private let factory: PrometheusMetricsFactory
    private let counters = Handles<CoreMetrics.Counter>()
    private let timers = Handles<CoreMetrics.Timer>()
    /// Webhooks per minute by result, for the console's overview (the counters only add up).
    let webhookMinutes = MinuteCounts()
    /// Services no longer configured that had pending deliveries at the last scrape.
    private let formerlyOrphaned = NIOLockedValueBox<Set<String>>([])

    init(registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry()) {
        self.registry = registry
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.defaultDurationHistogramBuckets = [
            .milliseconds(1), .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100),
            .milliseconds(250), .milliseconds(500), .seconds(1), .seconds(2.5), .seconds(5), .seconds(10), .seconds(30),
            // Kora's and a service's time-outs go up to minutes: a slow-down past 30 s must not read as 30 s.
            .seconds(60), .seconds(120), .seconds(300),
        ]
        self.factory = factory
    }

    /// One webhook answered: `accepted`, `duplicate`, `unrouted`, or the error code, with why for `UNAVAILABLE`.
    func webhook(_ result: String, reason: String? = nil) {
        counter("kora_sidecar_webhooks_total", [("result", result)] + (reason.map { [("reason", $0)] } ?? [])).increment()
        webhookMinutes.add(result, at: .now())
    }

    /// One webhook taken in report-only mode although its signature failed, with the failure's code,
    /// so that a rollout shows when `enforce` can be switched on.
    func webhookUnverified(reason: String) {
        counter("kora_sidecar_webhooks_total", [("result", "unverified"), ("reason", reason)]).increment()
        webhookMinutes.add("unverified", at: .now())
    }

    /// Calls to Kora left in the budget now (-1 while no limit is known).
    func koraBudgetRemaining(_ remaining: Int) {
        Gauge(label: "kora_sidecar_kora_budget_remaining", dimensions: [], factory: factory).record(remaining)
    }

    /// Calls waiting for a turn in the Kora budget.
    func koraCallsWaiting(_ count: Int) {
        Gauge(label: "kora_sidecar_kora_calls_waiting", dimensions: [], factory: factory).record(count)
    }

    /// How long a call waited for its turn.
    func koraWaited(milliseconds: Int) {
        timer("kora_sidecar_kora_budget_wait_seconds", []).recordMilliseconds(milliseconds)
    }

    /// A call refused with 429 `RATE_LIMITED` because no turn came within `kora.rateLimit.maxWait`.
    func koraCallRefused() {
        counter("kora_sidecar_kora_calls_refused_total", []).increment()
    }

    /// A delivery whose stored body could not be opened (its key is not configured, or it was altered).
    func bodyUnreadable() {
        counter("kora_sidecar_stored_bodies_unreadable_total", []).increment()
    }

    /// A webhook signed with a configured secret, refused as outside the tolerance window, whose
    /// event was never accepted.
    func webhookSignedLate() {
        counter("kora_sidecar_webhooks_signed_late_total", []).increment()
    }

    /// A call the proxy refused before Kora saw it: `UNAUTHORIZED` (no service has its token),
    /// `FORBIDDEN` (the service's allow list), `NOT_FOUND`, `INVALID_PATH`, or its body:
    /// `PAYLOAD_TOO_LARGE`, `UNAVAILABLE` (the listener's budget for proxied bodies spent).
    func proxyCallRefused(_ code: String) {
        counter("kora_sidecar_proxy_refused_total", [("code", code)]).increment()
    }

    /// Kora refused the configured API key or tenant (401 or 403): every proxied call fails until it is fixed.
    func koraCredentialsRejected() {
        counter("kora_sidecar_kora_credentials_rejected_total", []).increment()
    }

    /// One delivery attempt to `service` and what followed: `delivered`, `retry`, `dead` or `refused`.
    func delivery(service: String, result: String, milliseconds: Int) {
        counter("kora_sidecar_deliveries_total", [("service", service), ("result", result)]).increment()
        timer("kora_sidecar_delivery_duration_seconds", [("service", service)]).recordMilliseconds(milliseconds)
    }

    /// One call to Kora through the proxy: its status class (`2xx` … `5xx`, or `error`) and duration.
    func koraCall(statusClass: String, milliseconds: Int) {
        counter("kora_sidecar_kora_requests_total", [("status_class", statusClass)]).increment()
        timer("kora_sidecar_kora_request_duration_seconds", []).recordMilliseconds(milliseconds)
    }

    private func counter(_ label: String, _ dimensions: [(String, String)]) -> CoreMetrics.Counter {
        counters.handle(label, dimensions) { CoreMetrics.Counter(label: label, dimensions: dimensions, factory: factory) }
    }

    private func timer(_ label: String, _ dimensions: [(String, String)]) -> CoreMetrics.Timer {
        timers.handle(label, dimensions) { CoreMetrics.Timer(label: label, dimensions: dimensions, factory: factory) }
    }

    /// How long a scrape waits for the store. Each store call may wait its own time-out (5 s with
    /// PostgreSQL), and three in a row outlasted Prometheus' 10 s scrape time-out: the scrape failed,
    /// `kora_sidecar_ready` had no sample, and the alert for a store that is down could not fire.
    static let storeWait = Duration.seconds(2)
    /// The store's counts, each asked once at a time however often `/metrics` is scraped: a scan
    /// of the outbox can outlast ``storeWait`` on a large table.
    private let unroutedQuery = SingleFlight<Void>()
    private let depthQuery = SingleFlight<Void>()
    /// The counts last read, kept by the query itself when it ends: one that outlasts a scrape's
    /// wait serves the next scrape, and the oldest pending ages, computed at each scrape from the
    /// times read, keep growing while the store does not answer (a stalled outbox still alerts).
    private let lastUnrouted = NIOLockedValueBox<Int?>(nil)
    private let lastDepth = NIOLockedValueBox<(depth: [OutboxDepth], at: UnixTime)?>(nil)

    /// Refreshes the outbox and readiness gauges, then renders every metric. The store is asked
    /// three things at once, each for at most ``storeWait``: no answer in time means not ready, and
    /// the outbox gauges show the counts last read.
    func render(store: any SidecarStore, services: [String], readiness: Readiness, breakers: ServiceBreakers, now: UnixTime) async -> String {
        async let ready = try? Deadline.run(after: Self.storeWait, error: { CancellationError() }) { await readiness.problem() == nil }
        async let unroutedRead: Void? = try? Deadline.run(after: Self.storeWait, error: { CancellationError() }) {
            await self.unroutedQuery.run { if let count = try? await store.unroutedCount() { self.lastUnrouted.withLockedValue { $0 = count } } }
        }
        async let depthRead: Void? = try? Deadline.run(after: Self.storeWait, error: { CancellationError() }) {
            await self.depthQuery.run { if let depth = try? await store.depth() { self.lastDepth.withLockedValue { $0 = (depth, .now()) } } }
        }
        _ = await (unroutedRead, depthRead)
        let unroutedCount = lastUnrouted.withLockedValue { $0 }, lastRead = lastDepth.withLockedValue { $0 }
        let outboxDepth = lastRead?.depth
        if let lastRead {
            // How old the outbox gauges are: large when the store does not answer the count in time.
            Gauge(label: "kora_sidecar_outbox_counts_age_seconds", dimensions: [], factory: factory)
                .record(Double(max(0, now.milliseconds - lastRead.at.milliseconds)) / 1000)
        }
        Gauge(label: "kora_sidecar_ready", dimensions: [], factory: factory).record(await ready == true ? 1 : 0)
        // Readiness fails only below 1 MiB free: this is the warning before it.
        if let sqlite = store as? SQLiteStore,
            let free = try? await Deadline.run(after: Self.storeWait, error: { CancellationError() }, { try await sqlite.freeDiskBytes() })
        {
            Gauge(label: "kora_sidecar_store_free_bytes", dimensions: [], factory: factory).record(Double(free))
        }
        for breaker in breakers.all {
            let current = breaker.snapshot.state
            for state in ServiceBreaker.State.allCases {
                Gauge(label: "kora_sidecar_service_state", dimensions: [("service", breaker.service), ("state", state.rawValue)], factory: factory)
                    .record(state == current ? 1 : 0)
            }
        }
        if let unrouted = unroutedCount {
            Gauge(label: "kora_sidecar_unrouted_events", dimensions: [], factory: factory).record(unrouted)
        }
        if let depth = outboxDepth {
            // A service no longer configured has gauges while deliveries for it are pending: nothing
            // sends them any more, and its oldest pending age says so. Once none is, they all read 0.
            let orphaned = Set(depth.filter { $0.status == .pending && $0.count > 0 && !services.contains($0.service) }.map(\.service))
            let cleared = formerlyOrphaned.withLockedValue { former in
                defer { former = orphaned }
                return former.subtracting(orphaned)
            }
            for service in services + orphaned.sorted() + cleared.sorted() {
                let current = cleared.contains(service) ? [] : depth
                for status in DeliveryStatus.allCases {
                    let count = current.first { $0.service == service && $0.status == status }?.count ?? 0
                    Gauge(label: "kora_sidecar_outbox_depth", dimensions: [("service", service), ("state", status.rawValue)], factory: factory)
                        .record(count)
                }
                let oldest = current.first { $0.service == service && $0.status == .pending }?.oldestSince
                let age = oldest.map { Double(max(0, now.milliseconds - $0.milliseconds)) / 1000 } ?? 0
                Gauge(label: "kora_sidecar_oldest_pending_age_seconds", dimensions: [("service", service)], factory: factory).record(age)
            }
        }
        var buffer: [UInt8] = []
        registry.emit(into: &buffer)
        return String(decoding: buffer, as: UTF8.self)
    }
}

/// The counters or timers of the request paths, each made once per label set: making one through
/// the factory checks the names and looks it up under the registry's lock on every call.
private final class Handles<Metric: Sendable>: Sendable {
    private let made = NIOLockedValueBox<[[String]: Metric]>([:])

    /// The handle for `label` and `dimensions`, made by `make` the first time.
    func handle(_ label: String, _ dimensions: [(String, String)], make: () -> Metric) -> Metric {
        made.withLockedValue { made in
            let key = dimensions.reduce(into: [label]) { $0 += [$1.0, $1.1] }
            if let metric = made[key] { return metric }
            let metric = make()
            made[key] = metric
            return metric
        }
    }
}

/// Counts by name for each of the last hour's minutes.
final class MinuteCounts: Sendable {
    /// One minute's counts.
    struct Minute: Sendable, Equatable {
        var start: UnixTime
        var counts: [String: Int]
    }

    private static let kept: Int64 = 60
    private let minutes = NIOLockedValueBox<[Int64: [String: Int]]>([:])

    func add(_ name: String, at time: UnixTime) {
        let minute = time.seconds / 60
        minutes.withLockedValue { minutes in
            minutes[minute, default: [:]][name, default: 0] += 1
            if minutes.count > Self.kept { minutes = minutes.filter { $0.key > minute - Self.kept } }
        }
    }

    /// The last `count` minutes up to `now`, oldest first, each present even when nothing happened.
    func last(_ count: Int, now: UnixTime) -> [Minute] {
        let current = now.seconds / 60
        let counts = minutes.withLockedValue { $0 }
        return (current - Int64(count) + 1...current).map { Minute(start: UnixTime(milliseconds: $0 * 60_000), counts: counts[$0] ?? [:]) }
    }
}
