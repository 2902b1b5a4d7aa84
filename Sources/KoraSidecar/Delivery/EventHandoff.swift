import KoraSidecarCore
import Logging
import NIOConcurrencyHelpers

/// What became of an accepted event handed to a delivery mode.
enum HandoffResult: Sendable, Equatable {
    /// Delivered (`direct`) or committed for delivery (`queued`) to this many services.
    case taken(recipients: Int)
    /// No service takes it: kept as unrouted for an operator to route later.
    case unrouted
    /// Seen within the de-duplication window: acknowledged, not delivered again.
    case duplicate
}

/// A delivery mode (`queued` or `direct`) as the webhook pipeline sees it. Each mode owns its
/// de-duplication and in-flight bookkeeping, and decides when to route: `route` may read the store
/// (`onlyOwnVerifications`), so a mode that can tell a duplicate first does so.
protocol EventHandoff: Sendable {
    /// Takes `event`, received at `now`; ids seen since `dedupSince` are duplicates.
    /// - Throws: 503 when the store cannot be reached or a service did not take the event, so Kora retries.
    func take(
        _ event: KoraEvent, at now: UnixTime, dedupSince: UnixTime, route: () async throws -> [DeliveryService], log: Logger.Metadata
    ) async throws(SidecarHTTPError) -> HandoffResult
}

extension EventHandoff {
    /// Commits `event` with a pending delivery per recipient (none: kept as unrouted); `.duplicate`
    /// when the store has seen it within the window (atomic across replicas).
    func commit(
        _ event: KoraEvent, for recipients: [DeliveryService], at now: UnixTime, dedupSince: UnixTime, store: any SidecarStore,
        logger: Logger, log: Logger.Metadata
    ) async throws(SidecarHTTPError) -> HandoffResult {
        do {
            // Each store answers within its own time-out (5 s), on a stalled disk too.
            let result = try await store.enqueue(event, services: recipients.map(\.name), at: now, dedupSince: dedupSince)
            if result == .duplicate { return .duplicate }
            return recipients.isEmpty ? .unrouted : .taken(recipients: recipients.count)
        } catch {
            logger.error("Webhook not stored", metadata: log.merging(["error": "\(error)"]) { $1 })
            throw .unavailable("The sidecar could not store the event; retry later.", reason: .store)
        }
    }

    /// The services `route` names, or a 503 when it could not read the store.
    func recipients(
        _ route: () async throws -> [DeliveryService], logger: Logger, log: Logger.Metadata
    ) async throws(SidecarHTTPError) -> [DeliveryService] {
        do {
            return try await route()
        } catch {
            throw storeUnavailable(error, logger: logger, log: log)
        }
    }

    /// Logs a failed store read and gives the 503 that makes Kora retry.
    func storeUnavailable(_ error: any Error, logger: Logger, log: Logger.Metadata) -> SidecarHTTPError {
        logger.error("Store unavailable", metadata: log.merging(["error": "\(error)"]) { $1 })
        return .storeUnavailable()
    }
}

/// `queued`: commit to the outbox, then wake the dispatcher. The store de-duplicates in the same
/// transaction that stores the deliveries, so routing comes first.
struct QueuedHandoff: EventHandoff {
    let store: any SidecarStore
    let dispatcher: OutboxDispatcher
    let logger: Logger

    func take(
        _ event: KoraEvent, at now: UnixTime, dedupSince: UnixTime, route: () async throws -> [DeliveryService], log: Logger.Metadata
    ) async throws(SidecarHTTPError) -> HandoffResult {
        let recipients = try await recipients(route, logger: logger, log: log)
        let result = try await commit(event, for: recipients, at: now, dedupSince: dedupSince, store: store, logger: logger, log: log)
        if case .taken = result { dispatcher.notify(services: recipients.map(\.name)) }
        return result
    }
}

/// `direct`: deliver while Kora waits; 200 only when every service answered 2xx. A duplicate is
/// told from memory or the store before routing; an event no service takes is committed as unrouted.
struct DirectHandoff: EventHandoff {
    let store: any SidecarStore
    let sender: EventSender
    let delivered: DeliveredEvents
    let breakers: ServiceBreakers
    let rateLimits: ServiceRateLimits
    let metrics: SidecarMetrics
    let logger: Logger
    private let inFlight = InFlightEvents()

    init(
        store: any SidecarStore, sender: EventSender, delivered: DeliveredEvents, breakers: ServiceBreakers, rateLimits: ServiceRateLimits,
        metrics: SidecarMetrics, logger: Logger
    ) {
        self.store = store
        self.sender = sender
        self.delivered = delivered
        self.breakers = breakers
        self.rateLimits = rateLimits
        self.metrics = metrics
        self.logger = logger
    }

    func take(
        _ event: KoraEvent, at now: UnixTime, dedupSince: UnixTime, route: () async throws -> [DeliveryService], log: Logger.Metadata
    ) async throws(SidecarHTTPError) -> HandoffResult {
        // Kora's two copies of an event (dashboard and callback URL) arrive together: the second
        // waits for Kora's retry rather than being delivered twice.
        guard inFlight.begin(event.dedupKeys) else { throw .unavailable("The same event is being delivered now; retry later.", reason: .inFlight) }
        defer { inFlight.end(event.dedupKeys) }
        do {
            if try await delivered.contains(any: event.duplicateKeys, since: dedupSince) { return .duplicate }
        } catch {
            throw storeUnavailable(error, logger: logger, log: log)
        }
        let recipients = try await recipients(route, logger: logger, log: log)
        if recipients.isEmpty {
            return try await commit(event, for: [], at: now, dedupSince: dedupSince, store: store, logger: logger, log: log)
        }
        try admit(recipients, log)
        guard await deliver(event, to: recipients, log) else { throw .unavailable("A service did not accept the event; retry later.", reason: .serviceRefused) }
        delivered.record(event.rememberedKeys, at: now)
        return .taken(recipients: recipients.count)
    }

    /// Refuses at once, rather than after a time-out, when a recipient is paused by its breaker or
    /// over its rate limit: Kora retries later.
    private func admit(_ recipients: [DeliveryService], _ log: Logger.Metadata) throws(SidecarHTTPError) {
        let now = UnixTime.now()
        for (index, service) in recipients.enumerated() {
            let refusal =
                switch ServiceHold.check(service.name, breakers: breakers, rateLimits: rateLimits, now: now) {
                case .paused?: "Service \(service.name) is paused after failed deliveries; retry later."
                case .overRate?: "Service \(service.name) is over its delivery rate; retry later."
                case nil: String?.none
                }
            guard let refusal else { continue }
            for earlier in recipients[..<index] { ServiceHold.giveBack(earlier.name, breakers: breakers, rateLimits: rateLimits) }
            logger.notice("Direct delivery held back", metadata: log.merging(["service": "\(service.name)"]) { $1 })
            throw .unavailable(refusal, reason: .serviceHeld)
        }
    }

    /// Sends to every recipient at once; true when every one took it.
    private func deliver(_ event: KoraEvent, to recipients: [DeliveryService], _ log: Logger.Metadata) async -> Bool {
        // One service, the usual case, is sent to from this task: a child task costs a thread hop.
        let results: [(name: String, result: AttemptResult)] =
            if recipients.count == 1 {
                [(recipients[0].name, await sender.send(event, to: recipients[0], attempt: 1))]
            } else {
                await withTaskGroup(of: (name: String, result: AttemptResult).self) { group in
                    for service in recipients {
                        group.addTask { (service.name, await sender.send(event, to: service, attempt: 1)) }
                    }
                    return await group.reduce(into: []) { $0.append($1) }
                }
            }
        var everyServiceTookIt = true
        for (name, result) in results {
            metrics.delivery(service: name, result: result.succeeded ? "delivered" : "refused", milliseconds: result.durationMilliseconds)
            ServiceHold.record(result, of: name, breakers: breakers, rateLimits: rateLimits, now: .now())
            guard !result.succeeded else { continue }
            var metadata = log
            metadata["service"] = "\(name)"
            metadata["delivery.status"] = "\(result.statusCode.map(String.init) ?? "-")"
            if let error = result.error { metadata["error"] = "\(error)" }
            logger.warning("Direct delivery refused", metadata: metadata)
            everyServiceTookIt = false
        }
        return everyServiceTookIt
    }
}

/// The de-duplication keys of the events being delivered in `direct` mode right now: every key,
/// since copies of one event told apart only by an unsigned `X-Webhook-ID` share its body's digest.
final class InFlightEvents: Sendable {
    private let keys = NIOLockedValueBox<Set<String>>([])

    /// Marks `keys` in flight; false, marking none, when any of them already was.
    func begin(_ keys: [String]) -> Bool {
        self.keys.withLockedValue { inFlight in
            guard inFlight.isDisjoint(with: keys) else { return false }
            inFlight.formUnion(keys)
            return true
        }
    }

    func end(_ keys: [String]) { self.keys.withLockedValue { $0.subtract(keys) } }
}
