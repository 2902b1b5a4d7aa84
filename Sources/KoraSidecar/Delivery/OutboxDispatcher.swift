import KoraSidecarCore
import Logging
import NIOConcurrencyHelpers
import ServiceLifecycle
import Synchronization

/// Delivers queued events in the background (SPEC §4.5 `queued`).
///
/// Each service has its own workers (`delivery.concurrency` of them), so a service that is down
/// never takes the workers of a healthy one. A worker leases one due delivery at a time, sends it,
/// and records the attempt with the next step from the ``RetryPolicy``. On graceful shutdown the
/// workers stop leasing and finish what they hold within the drain time-out; anything unfinished
/// stays pending (its lease ends) and is delivered after the next start. A busy worker records an
/// attempt and leases its next delivery in one store call.
final class OutboxDispatcher: Service, Sendable {
    private let store: any SidecarStore
    private let sender: EventSender
    private let services: [DeliveryService]
    private let policy: RetryPolicy
    private let concurrency: Int
    /// Whether a verification's events go to a service in the order they were accepted.
    private let ordered: Bool
    /// Each service's circuit breaker and rate limit (shared with `direct` mode and `/admin/services`).
    private let breakers: ServiceBreakers
    private let rateLimits: ServiceRateLimits
    /// Announces dead deliveries to the services that subscribe to `sidecar.delivery.dead`.
    private let operational: OperationalEvents?
    private let drainTimeout: Duration
    private let metrics: SidecarMetrics
    private let logger: Logger
    /// One bell per service: an event wakes a worker of each service that receives it, no other.
    private let doorbells: [String: Doorbell]
    /// When each service's next delivery is due, asked once at a time by its idle workers: the
    /// query reads every pending delivery of the service, and sixteen workers asking it each
    /// few seconds over a long backlog kept the store's reader busy.
    private let dueTimes: [String: SingleFlight<Result<UnixTime?, any Error>>]
    /// The earliest retry a worker of each service scheduled since an idle worker last looked: the
    /// shared answer may come from a query that began before that retry was written.
    private let retries: [String: NIOLockedValueBox<UnixTime?>]
    /// "Outbox unavailable", once a minute for each service: every worker meets the same outage each second.
    private let outages: [String: LogThrottle]
    /// "Delivery not attempted", once a minute for each service: out of file descriptors, every
    /// delivery due meets it.
    private let ownFailures: [String: LogThrottle]
    /// Rung once, on shutdown.
    private let shutdownBell = Doorbell()
    private let stopping = Atomic(false)

    /// Longest a worker sleeps before looking for due deliveries again.
    static let idlePoll = Duration.seconds(5)
    /// How long a worker waits after the sidecar could not open a connection (out of file descriptors).
    static let ownFailurePause = Duration.seconds(1)

    init(
        store: any SidecarStore, sender: EventSender, services: [DeliveryService], policy: RetryPolicy, concurrency: Int,
        ordering: DeliveryOrdering = .verification, breakers: ServiceBreakers? = nil, rateLimits: ServiceRateLimits? = nil,
        operational: OperationalEvents? = nil, drainTimeout: Duration = .seconds(10), metrics: SidecarMetrics = SidecarMetrics(), logger: Logger
    ) {
        self.operational = operational
        self.ordered = ordering == .verification
        self.breakers = breakers ?? ServiceBreakers(services, baseCooldown: .seconds(30), logger: logger)
        self.rateLimits = rateLimits ?? ServiceRateLimits(services)
        self.metrics = metrics
        self.store = store
        self.sender = sender
        self.services = services
        self.doorbells = Self.perService(services) { Doorbell() }
        self.dueTimes = Self.perService(services) { SingleFlight() }
        self.retries = Self.perService(services) { NIOLockedValueBox(nil) }
        self.outages = Self.perService(services) { LogThrottle(every: .seconds(60)) }
        self.ownFailures = Self.perService(services) { LogThrottle(every: .seconds(60)) }
        self.policy = policy
        self.concurrency = concurrency
        self.drainTimeout = drainTimeout
        self.logger = logger
    }

    /// One `make()` for each service, by its name.
    private static func perService<T>(_ services: [DeliveryService], _ make: () -> T) -> [String: T] {
        Dictionary(services.map { ($0.name, make()) }, uniquingKeysWith: { first, _ in first })
    }

    /// Tells a worker of each of `services` that a new delivery is due now.
    func notify(services: [String]) {
        for name in services { doorbells[name]?.ring() }
    }

    package func run() async throws {
        await warnOfOrphanedDeliveries()
        // A proxy-only sidecar has no service to deliver to: stay up until shutdown, like every service.
        guard !services.isEmpty else {
            try? await gracefulShutdown()
            return
        }
        try await store.releaseLeases()
        await withGracefulShutdownHandler {
            await withTaskGroup(of: Bool.self) { group in
                group.addTask {
                    await withTaskGroup(of: Void.self) { workers in
                        for service in self.services {
                            for _ in 0..<self.concurrency { workers.addTask { await self.work(for: service) } }
                        }
                    }
                    return true
                }
                group.addTask {
                    while !self.stopping.load(ordering: .relaxed), !Task.isCancelled {
                        await self.shutdownBell.wait(after: self.shutdownBell.generation, timeout: .seconds(1))
                    }
                    try? await Task.sleep(for: self.drainTimeout)
                    return false
                }
                if await group.next() == false {
                    self.logger.warning("Drain time-out reached; unfinished deliveries stay pending", metadata: [:])
                }
                group.cancelAll()
            }
        } onGracefulShutdown: {
            self.stopping.store(true, ordering: .relaxed)
            self.shutdownBell.ringAll()
            self.doorbells.values.forEach { $0.ringAll() }
        }
        if let operational {
            _ = try? await Deadline.run(after: .seconds(5), error: { CancellationError() }) { await operational.finishStoring() }
        }
    }

    /// Says which services the store still has pending deliveries for though the configuration no
    /// longer has them (renamed or removed): no worker sends those, so they would wait unseen.
    private func warnOfOrphanedDeliveries() async {
        guard let depth = try? await store.depth() else { return }
        for row in depth where row.status == .pending && row.count > 0 && !services.contains(where: { $0.name == row.service }) {
            logger.warning(
                "Deliveries are pending for a service the configuration no longer has; none is sent until a service of that name is configured again",
                metadata: ["service": "\(row.service)", "pending": "\(row.count)"])
        }
    }

    private func work(for service: DeliveryService) async {
        let lease = service.timeout + .seconds(30)
        guard let doorbell = doorbells[service.name] else { return }
        var held: DeliveryJob?
        while !Task.isCancelled {
            // What a worker holds it delivers, also once stopping: the drain time-out bounds it.
            if let job = held {
                held = await deliver(job, to: service, lease: lease)
                continue
            }
            // The generation first: a stop that rings between the two reads still wakes this worker.
            let generation = doorbell.generation
            guard !stopping.load(ordering: .relaxed) else { return }
            // A paused service, or one over its rate, waits without anything leased: no attempt is used up.
            if let wait = holdBack(service) {
                await doorbell.wait(after: generation, timeout: min(wait, Self.idlePoll))
                continue
            }
            let job: DeliveryJob?
            do {
                job = try await store.claimDue(service: service.name, now: .now(), limit: 1, lease: lease, ordered: ordered).first
            } catch {
                ServiceHold.giveBack(service.name, breakers: breakers, rateLimits: rateLimits)
                outageLog(service, error)
                await doorbell.wait(after: generation, timeout: .seconds(1))
                continue
            }
            if let job {
                held = job
                continue
            }
            // Nothing was due: the attempt that was let go sends nothing.
            ServiceHold.giveBack(service.name, breakers: breakers, rateLimits: rateLimits)
            await doorbell.wait(after: generation, timeout: await idleWait(for: service))
        }
    }

    private func outageLog(_ service: DeliveryService, _ error: any Error) {
        outages[service.name]?.log(["service": "\(service.name)", "error": "\(error)"]) { logger.error("Outbox unavailable", metadata: $0) }
    }

    /// How long an idle worker of `service` sleeps: until its next delivery is due, at most
    /// ``idlePoll``; a second when the store cannot say.
    private func idleWait(for service: DeliveryService) async -> Duration {
        let shared = await dueTimes[service.name]?.run { [store, ordered] in
            do { return .success(try await store.nextDueTime(service: service.name, ordered: ordered)) } catch { return .failure(error) }
        }
        let retry = retries[service.name]?.withLockedValue { retry in
            defer { retry = nil }
            return retry
        }
        do {
            guard let next = [try shared?.get(), retry].compactMap({ $0 }).min() else { return Self.idlePoll }
            return .milliseconds(min(max(next.milliseconds - UnixTime.now().milliseconds, 1), Self.idlePoll.milliseconds))
        } catch {
            outageLog(service, error)
            return .seconds(1)
        }
    }

    /// How long `service` must wait before its next attempt (its breaker is open, or its rate
    /// limit spent), or nil when it may go now.
    private func holdBack(_ service: DeliveryService) -> Duration? {
        let now = UnixTime.now()
        switch ServiceHold.check(service.name, breakers: breakers, rateLimits: rateLimits, now: now) {
        case .paused(let until)?: return .milliseconds(max(until.milliseconds - now.milliseconds, 1))
        case .overRate(let wait)?: return wait
        case nil: return nil
        }
    }

    /// Delivers `job`, records the attempt and, unless stopping, leases the next due delivery in the
    /// same store call (the busy path: one transaction per delivery instead of two) when the service
    /// may take it now.
    private func deliver(_ job: DeliveryJob, to service: DeliveryService, lease: Duration) async -> DeliveryJob? {
        let started = UnixTime.now()
        let result: AttemptResult
        let next: NextStep
        if let problem = job.bodyProblem {
            // Nothing to send (a key left out of the configuration, an erasure racing the lease):
            // dead at once, with why, so that an operator sees it and can retry once the key is back.
            result = AttemptResult(statusCode: nil, error: problem.description, durationMilliseconds: 0)
            next = .dead
            metrics.bodyUnreadable()
        } else {
            result = await sender.send(job.event, to: service, attempt: job.attempt)
            // Cut off by the drain time-out: not an attempt, unless the service had already taken it.
            // It goes again once its lease ends (at the next start; with PostgreSQL, when it expires).
            if Task.isCancelled, !result.succeeded {
                breakers[service.name]?.withdrawProbe()
                logger.notice(
                    "Delivery cut off by the drain time-out; it stays pending",
                    metadata: ["webhook.id": "\(job.event.id)", "service": "\(service.name)", "delivery.id": "\(job.deliveryID)"])
                return nil
            }
            // The sidecar could not open a connection (out of file descriptors): that says nothing of
            // the service and spends none of its retries. It goes again once its lease ends.
            if result.ownFailure {
                ServiceHold.record(result, of: service.name, breakers: breakers, rateLimits: rateLimits, now: .now())
                metrics.delivery(service: service.name, result: "not_attempted", milliseconds: result.durationMilliseconds)
                let metadata: Logger.Metadata = [
                    "webhook.id": "\(job.event.id)", "service": "\(service.name)", "delivery.id": "\(job.deliveryID)", "error": "\(result.error ?? "-")",
                ]
                ownFailures[service.name]?.log(metadata) {
                    logger.error("Delivery not attempted: the sidecar could not open a connection; it goes again once its lease ends", metadata: $0)
                }
                // Every delivery due would meet the same limit: the worker pauses, rather than lease
                // each of them in turn, a write and a failed connect apiece, for as long as it lasts.
                let generation = shutdownBell.generation
                if !stopping.load(ordering: .relaxed) { await shutdownBell.wait(after: generation, timeout: Self.ownFailurePause) }
                return nil
            }
            next = policy.next(after: job.attempt, result: result, now: .now())
        }
        let record = AttemptRecord(
            attempt: job.attempt, at: started, statusCode: result.statusCode, error: result.error,
            durationMilliseconds: result.durationMilliseconds)
        var metadata: Logger.Metadata = [
            "webhook.id": "\(job.event.id)", "service": "\(service.name)", "delivery.id": "\(job.deliveryID)",
            "delivery.attempt": "\(job.attempt)", "delivery.status": "\(result.statusCode.map(String.init) ?? "-")",
        ]
        if let error = result.error { metadata["error"] = "\(error)" }
        if job.bodyProblem == nil {
            ServiceHold.record(result, of: service.name, breakers: breakers, rateLimits: rateLimits, now: .now())
        } else {
            // Nothing went to the service: it says nothing of its health, and spent neither probe nor token.
            ServiceHold.giveBack(service.name, breakers: breakers, rateLimits: rateLimits)
        }
        // A death's announcement, stored with it in one transaction (an erasure cannot come between).
        let announcing =
            next == .dead
            ? operational?.deadDelivery(
                job.event, service: service.name, deliveryID: job.deliveryID, attempts: job.attempt, lastStatusCode: result.statusCode,
                lastError: result.error) : nil
        /// Counts, logs and announces what the store answered: what it did not record (the lease had
        /// passed to another worker, say, a replica whose clock is ahead, or an erasure removed the
        /// delivery) is neither counted nor announced as what followed.
        func recorded(_ recorded: Bool) {
            guard recorded else {
                metrics.delivery(service: service.name, result: "not_recorded", milliseconds: result.durationMilliseconds)
                logger.warning(
                    "Delivery result not recorded: its lease had passed to another worker (which may send it too), or the delivery was erased",
                    metadata: metadata)
                return
            }
            metrics.delivery(service: service.name, result: next.metricName, milliseconds: result.durationMilliseconds)
            switch next {
            case .delivered: logger.info("Delivered", metadata: metadata)
            case .retry(let at):
                logger.notice("Delivery failed; will retry", metadata: metadata)
                retries[service.name]?.withLockedValue { $0 = min($0 ?? at, at) }
            case .dead:
                logger.error("Delivery dead; waiting for an operator", metadata: metadata)
                if let announcing { operational?.stored(announcing) }
            }
        }
        // The next delivery is leased in the same call only when it may go now (it takes a token);
        // not after a death, whose announcement is stored with it.
        let leasesNext =
            announcing == nil && !stopping.load(ordering: .relaxed) && (breakers[service.name]?.isClosed ?? true)
            && (rateLimits[service.name]?.take(now: .now()) ?? .zero) == .zero
        do {
            guard leasesNext else {
                recorded(
                    try await store.finish(deliveryID: job.deliveryID, leasedUntil: job.leaseUntil, attempt: record, next: next, announcing: announcing))
                return nil
            }
            let finished = try await store.finishAndClaimNext(
                deliveryID: job.deliveryID, leasedUntil: job.leaseUntil, attempt: record, next: next, service: service.name, now: .now(),
                lease: lease, ordered: ordered)
            recorded(finished.recorded)
            // Nothing else due: the token taken for it goes back (the breaker was closed: no probe).
            if finished.next == nil { rateLimits[service.name]?.giveBack() }
            return finished.next
        } catch {
            if leasesNext { rateLimits[service.name]?.giveBack() }
            metrics.delivery(service: service.name, result: "not_recorded", milliseconds: result.durationMilliseconds)
            logger.error("Could not record a delivery attempt", metadata: metadata.merging(["error": "\(error)"]) { $1 })
            return nil
        }
    }
}

extension NextStep {
    /// The `result` label of the deliveries counter.
    var metricName: String {
        switch self {
        case .delivered: "delivered"
        case .retry: "retry"
        case .dead: "dead"
        }
    }
}
