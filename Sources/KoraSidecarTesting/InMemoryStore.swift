import KoraSidecar
import KoraSidecarCore
import NIOConcurrencyHelpers
import Synchronization

/// A ``SidecarStore`` held in memory, for tests that need no file: the same behaviour, no durability.
final class InMemoryStore: SidecarStore {
    private struct Delivery {
        var summary: DeliverySummary
        var event: KoraEvent
        var leaseUntil: UnixTime?
        var attempts: [AttemptRecord] = []
        /// When an operator last made it pending again; nil: since it was created.
        var pendingSince: UnixTime?

        /// Made pending again at `at` by an operator.
        mutating func requeue(at: UnixTime) {
            if summary.status != .pending { pendingSince = at }
            summary.status = .pending
            summary.nextAttemptAt = at
            summary.updatedAt = at
            leaseUntil = leaseUntil.flatMap { $0 > at ? $0 : nil }
        }
    }

    private struct State {
        var seen: [String: UnixTime] = [:]
        var deliveries: [Int64: Delivery] = [:]
        var nextID: Int64 = 1
        var quarantine: [QuarantinedPayload] = []
        var origins: [String: String] = [:]
        var unrouted: [Int64: (listing: UnroutedEvent, event: KoraEvent)] = [:]
        var idempotency: [String: IdempotencyRecord] = [:]
        /// Events whose body is gone, by event id.
        var bodyGone: [String: BodyProblem] = [:]
        var nextQuarantineID: Int64 = 1

        /// Whether an earlier delivery of the same verification is pending for the same service.
        func waitsBehindEarlier(_ delivery: Delivery) -> Bool {
            guard let verification = delivery.event.verificationID else { return false }
            return deliveries.values.contains {
                $0.event.verificationID == verification && $0.summary.service == delivery.summary.service && $0.summary.status == .pending
                    && $0.summary.id < delivery.summary.id
            }
        }

        mutating func enqueue(_ event: KoraEvent, services: [String], at: UnixTime, dedupSince: UnixTime) -> EnqueueResult {
            for key in event.duplicateKeys where (seen[key].map { $0 >= dedupSince } ?? false) { return .duplicate }
            for key in event.rememberedKeys { seen[key] = at }
            if services.isEmpty {
                let row = nextID
                nextID += 1
                unrouted[row] = (
                    UnroutedEvent(
                        row: row, eventID: event.id, eventType: event.type, verificationID: event.verificationID, receivedAt: at,
                        signatureVerified: event.signatureVerified),
                    event
                )
            }
            addDeliveries(of: event, to: services, at: at)
            return .accepted
        }

        /// Adds one pending delivery of `event` per service.
        mutating func addDeliveries(of event: KoraEvent, to services: [String], at: UnixTime) {
            for service in services {
                let id = nextID
                nextID += 1
                deliveries[id] = Delivery(
                    summary: DeliverySummary(
                        id: id, eventID: event.id, eventType: event.type, service: service, status: .pending, attempts: 0,
                        nextAttemptAt: at, lastStatusCode: nil, lastError: nil, createdAt: at, updatedAt: at,
                        verificationID: event.verificationID),
                    event: event)
            }
        }
    }

    private let state = NIOLockedValueBox(State())

    /// How many times a worker asked when its next delivery is due: it found nothing due and is
    /// about to wait (tests wait on it to know the dispatcher is idle).
    let nextDueLooks = Atomic(0)

    /// When set, every write fails with this error (fault injection in tests).
    private let failure = NIOLockedValueBox<(any Error)?>(nil)

    init() {}

    /// Makes every following write fail with `error`, or succeed again with nil.
    func failWrites(with error: (any Error)?) {
        failure.withLockedValue { $0 = error }
    }

    /// When set, every claim fails with this error (a store failing between two calls, in tests).
    private let claimFailure = NIOLockedValueBox<(any Error)?>(nil)

    /// Makes every following claim fail with `error`, or succeed again with nil.
    func failClaims(with error: (any Error)?) {
        claimFailure.withLockedValue { $0 = error }
    }

    /// When set, every origin lookup fails with this error (a store that cannot be read, in tests).
    private let originFailure = NIOLockedValueBox<(any Error)?>(nil)

    /// Makes every following origin lookup fail with `error`, or answer again with nil.
    func failOriginLookups(with error: (any Error)?) {
        originFailure.withLockedValue { $0 = error }
    }

    /// Awaited before each ``depth()`` answers (a slow count on a large outbox, in tests).
    private let depthHold = NIOLockedValueBox<(@Sendable () async -> Void)?>(nil)

    /// Makes each following ``depth()`` wait for `hold` first, or answer at once again with nil.
    func holdDepth(_ hold: (@Sendable () async -> Void)?) {
        depthHold.withLockedValue { $0 = hold }
    }

    private func write<T>(_ body: (inout State) throws -> T) throws -> T {
        if let error = failure.withLockedValue({ $0 }) { throw error }
        return try state.withLockedValue { try body(&$0) }
    }

    package func isDuplicate(eventID: String, since: UnixTime) async throws -> Bool {
        state.withLockedValue { ($0.seen[eventID].map { $0 >= since }) ?? false }
    }

    package func remember(_ seen: [(eventID: String, at: UnixTime)]) async throws {
        try write { state in
            for (eventID, at) in seen { state.seen[eventID] = max(at, state.seen[eventID] ?? at) }
        }
    }

    package func enqueue(_ event: KoraEvent, services: [String], at: UnixTime, dedupSince: UnixTime) async throws -> EnqueueResult {
        try write { state in state.enqueue(event, services: services, at: at, dedupSince: dedupSince) }
    }

    package func quarantine(_ payload: QuarantinedPayload) async throws {
        try write { state in
            var payload = payload
            payload.id = state.nextQuarantineID
            state.nextQuarantineID += 1
            state.quarantine.append(payload)
        }
    }

    package func recordOrigin(verificationID: String, service: String, at: UnixTime) async throws {
        try write { $0.origins[verificationID] = $0.origins[verificationID] ?? service }
    }

    package func origin(ofVerification verificationID: String) async throws -> String? {
        if let error = originFailure.withLockedValue({ $0 }) { throw error }
        return state.withLockedValue { $0.origins[verificationID] }
    }

    package func claimDue(service: String, now: UnixTime, limit: Int, lease: Duration, ordered: Bool) async throws -> [DeliveryJob] {
        if let error = claimFailure.withLockedValue({ $0 }) { throw error }
        return try write { state in
            let due = state.deliveries.values
                .filter {
                    $0.summary.service == service && $0.summary.status == .pending && ($0.summary.nextAttemptAt ?? now) <= now
                        && ($0.leaseUntil.map { $0 <= now } ?? true) && !(ordered && state.waitsBehindEarlier($0))
                }
                .sorted { ($0.summary.nextAttemptAt!, $0.summary.id) < ($1.summary.nextAttemptAt!, $1.summary.id) }
                .prefix(limit)
            return due.map { delivery in
                state.deliveries[delivery.summary.id]?.leaseUntil = now.adding(lease)
                return DeliveryJob(
                    deliveryID: delivery.summary.id, service: service, attempt: delivery.summary.attempts + 1, event: delivery.event,
                    bodyProblem: state.bodyGone[delivery.event.id], leaseUntil: now.adding(lease))
            }
        }
    }

    @discardableResult
    package func finish(
        deliveryID: Int64, leasedUntil: UnixTime, attempt: AttemptRecord, next: NextStep, announcing: Announcement?
    ) async throws -> Bool {
        try write { state in
            guard var delivery = state.deliveries[deliveryID], delivery.leaseUntil == leasedUntil else { return false }
            if let announcing { _ = state.enqueue(announcing.event, services: announcing.services, at: attempt.at, dedupSince: attempt.at) }
            delivery.attempts.append(attempt)
            delivery.leaseUntil = nil
            delivery.summary.attempts = attempt.attempt
            delivery.summary.lastStatusCode = attempt.statusCode
            delivery.summary.lastError = attempt.error
            delivery.summary.updatedAt = attempt.at
            switch next {
            case .delivered:
                delivery.summary.status = .delivered
                delivery.summary.nextAttemptAt = nil
            case .retry(let at):
                delivery.summary.status = .pending
                delivery.summary.nextAttemptAt = at
            case .dead:
                delivery.summary.status = .dead
                delivery.summary.nextAttemptAt = nil
            }
            state.deliveries[deliveryID] = delivery
            return true
        }
    }

    package func nextDueTime(service: String, ordered: Bool) async throws -> UnixTime? {
        nextDueLooks.add(1, ordering: .relaxed)
        return state.withLockedValue { state in
            state.deliveries.values
                .filter { $0.summary.service == service && $0.summary.status == .pending && !(ordered && state.waitsBehindEarlier($0)) }
                .compactMap { delivery in delivery.summary.nextAttemptAt.map { max($0, delivery.leaseUntil ?? $0) } }
                .min()
        }
    }

    package func releaseLeases() async throws {
        try write { state in
            for id in state.deliveries.keys { state.deliveries[id]?.leaseUntil = nil }
        }
    }

    /// Whether `filter` selects `delivery` (no status in the filter: any status).
    private static func selects(_ filter: DeliveryFilter, _ delivery: Delivery) -> Bool {
        (filter.statuses.isEmpty || filter.statuses.contains(delivery.summary.status))
            && (filter.service.map { $0 == delivery.summary.service } ?? true)
            && filter.selectsEvent(
                type: delivery.event.type, verificationID: delivery.event.verificationID, eventID: delivery.event.id,
                at: delivery.summary.createdAt)
    }

    package func deliveries(_ query: DeliveryQuery) async throws -> [DeliverySummary] {
        state.withLockedValue { state in
            Array(
                state.deliveries.values.filter { delivery in
                    Self.selects(query.filter, delivery) && (query.before.map { delivery.summary.id < $0 } ?? true)
                }
                    .map(\.summary).sorted { $0.id > $1.id }.prefix(query.limit))
        }
    }

    package func delivery(id: Int64) async throws -> DeliveryDetail? {
        state.withLockedValue { state in
            state.deliveries[id].map { delivery in
                let event: Result<KoraEvent, BodyProblem> = state.bodyGone[delivery.event.id].map { .failure($0) } ?? .success(delivery.event)
                return DeliveryDetail(summary: delivery.summary, attempts: delivery.attempts, event: event)
            }
        }
    }

    package func quarantined(limit: Int) async throws -> [QuarantinedPayload] {
        state.withLockedValue { Array($0.quarantine.reversed().prefix(limit)) }
    }

    package func unrouted(limit: Int?) async throws -> [UnroutedEvent] {
        state.withLockedValue { Array($0.unrouted.values.map(\.listing).sorted { $0.row > $1.row }.prefix(limit ?? .max)) }
    }

    package func unroutedCount() async throws -> Int { state.withLockedValue { $0.unrouted.count } }

    package func quarantinedCount() async throws -> Int { state.withLockedValue { $0.quarantine.count } }

    package func route(_ assignments: [(eventRow: Int64, services: [String])], at: UnixTime) async throws -> Int {
        try write { state in
            var created = 0
            for (row, services) in assignments where !services.isEmpty {
                guard let (_, event) = state.unrouted.removeValue(forKey: row) else { continue }
                state.addDeliveries(of: event, to: services, at: at)
                created += services.count
            }
            return created
        }
    }

    package func requeue(id: Int64, at: UnixTime) async throws -> Bool {
        try write { state in
            guard var delivery = state.deliveries[id], delivery.summary.status != .delivered, state.bodyGone[delivery.event.id] == nil
            else { return false }
            delivery.requeue(at: at)
            state.deliveries[id] = delivery
            return true
        }
    }

    package func requeue(_ filter: DeliveryFilter, at: UnixTime, dryRun: Bool) async throws -> RequeueCount {
        let (selected, gone) = state.withLockedValue { state in
            let matching = state.deliveries.values.filter { Self.selects(filter, $0) }
            return (matching.filter { state.bodyGone[$0.event.id] == nil }.map(\.summary.id), matching.count)
        }
        let count = RequeueCount(selected: selected.count, bodyGone: gone - selected.count)
        guard !dryRun else { return count }
        try write { state in
            for id in selected {
                guard var delivery = state.deliveries[id] else { continue }
                delivery.requeue(at: at)
                state.deliveries[id] = delivery
            }
        }
        return count
    }

    package func expireBodies(deliveredBefore: UnixTime, deadBefore: UnixTime, limit: Int) async throws -> Int {
        try write { state in
            let byEvent = Dictionary(grouping: state.deliveries.values, by: \.event.id)
            var expired = 0
            for (eventID, deliveries) in byEvent where state.bodyGone[eventID] == nil && expired < limit {
                let keeps = deliveries.contains { delivery in
                    switch delivery.summary.status {
                    case .pending: true
                    case .delivered: delivery.summary.updatedAt >= deliveredBefore
                    case .dead: delivery.summary.updatedAt >= deadBefore
                    }
                }
                if !keeps {
                    state.bodyGone[eventID] = .expired
                    expired += 1
                }
            }
            return expired
        }
    }

    /// One page holding every kept event (the whole store is in memory anyway).
    package func keptEvents(after: Int64, limit: Int) async throws -> (bodies: [KeptBody], last: Int64?) {
        guard after == 0 else { return ([], nil) }
        let bodies = state.withLockedValue { state in
            var seen = Set<String>()
            let events = (state.deliveries.values.map(\.event) + state.unrouted.values.map(\.event)).filter {
                state.bodyGone[$0.id] == nil && seen.insert($0.id).inserted
            }
            return events.map { KeptBody(owner: .event(id: $0.id, verificationID: $0.verificationID), body: $0.normalizedBody) }
        }
        return (bodies, 1)
    }

    package func keptQuarantined() async throws -> [KeptBody] {
        state.withLockedValue { $0.quarantine.map { KeptBody(owner: .quarantine($0.id), body: $0.body) } }
    }

    package func erase(verificationIDs: [String], eventIDs: [String], quarantineIDs: [Int64], mentions: [[UInt8]]) async throws -> ErasureReport {
        try write { state in
            var report = ErasureReport(verificationIDs: verificationIDs)
            let ids = Set(verificationIDs)
            let eventIDs = Set(eventIDs)
            let erased = { (event: KoraEvent) in event.verificationID.map(ids.contains) ?? eventIDs.contains(event.id) }
            let deliveries = state.deliveries.filter { erased($0.value.event) }
            for id in deliveries.keys { state.deliveries[id] = nil }
            let unrouted = state.unrouted.filter { erased($0.value.event) }
            for row in unrouted.keys { state.unrouted[row] = nil }
            report.deliveries = deliveries.count
            report.events = Set(deliveries.values.map(\.event.id)).count + unrouted.count
            report.origins = state.origins.keys.filter(ids.contains).count
            for id in ids { state.origins[id] = nil }
            let named = state.idempotency.filter { record in
                guard case .answered(_, _, let body) = record.value.state else { return false }
                return mentions.contains { body.firstRange(of: $0) != nil }
            }
            for key in named.keys { state.idempotency[key] = nil }
            report.idempotencyKeys = named.count
            let before = state.quarantine.count
            state.quarantine.removeAll { quarantineIDs.contains($0.id) }
            report.quarantined = before - state.quarantine.count
            return report
        }
    }

    /// Nothing is sealed in memory.
    package func resealEvents(after: Int64) async throws -> (report: ResealReport, last: Int64?) { (ResealReport(), nil) }

    package func resealQuarantined() async throws -> ResealReport { ResealReport() }

    package func prune(deliveredBefore: UnixTime, seenBefore: UnixTime, limit: Int) async throws -> PruneResult {
        try write { state in
            let delivered = state.deliveries.filter { $0.value.summary.status == .delivered && $0.value.summary.updatedAt < deliveredBefore }
                .keys.sorted().prefix(limit)
            for id in delivered { state.deliveries[id] = nil }
            let seen = state.seen.filter { $0.value < seenBefore }.keys.sorted().prefix(limit)
            for id in seen { state.seen[id] = nil }
            let quarantined = state.quarantine.filter { $0.receivedAt < seenBefore }.prefix(limit).map(\.id)
            state.quarantine.removeAll { quarantined.contains($0.id) }
            let unrouted = state.unrouted.filter { $0.value.listing.receivedAt < seenBefore }.keys.sorted().prefix(limit)
            for row in unrouted { state.unrouted[row] = nil }
            let more = [delivered.count, seen.count, quarantined.count, unrouted.count].contains { $0 >= limit }
            return PruneResult(deliveries: delivered.count, seenIDs: seen.count, more: more)
        }
    }

    package func depth() async throws -> [OutboxDepth] {
        if let hold = depthHold.withLockedValue({ $0 }) { await hold() }
        return state.withLockedValue { state in
            Dictionary(grouping: state.deliveries.values) { "\($0.summary.service)\u{0}\($0.summary.status.rawValue)" }
                .values.map { group in
                    OutboxDepth(
                        service: group[0].summary.service, status: group[0].summary.status, count: group.count,
                        oldestSince: group[0].summary.status == .pending ? group.map { $0.pendingSince ?? $0.summary.createdAt }.min() : nil)
                }
        }
    }

    package func idempotencyRecord(service: String, key: String) async throws -> IdempotencyRecord? {
        state.withLockedValue { $0.idempotency[service + "\u{0}" + key] }
    }

    package func claimIdempotencyKey(service: String, key: String, digest: String, at: UnixTime) async throws -> IdempotencyRecord? {
        try write { state in
            if let existing = state.idempotency[service + "\u{0}" + key] { return existing }
            state.idempotency[service + "\u{0}" + key] = IdempotencyRecord(digest: digest, state: .inFlight, createdAt: at, updatedAt: at)
            return nil
        }
    }

    package func takeOverIdempotencyKey(service: String, key: String, from record: IdempotencyRecord, at: UnixTime) async throws -> Bool {
        try write { state in
            guard let stored = state.idempotency[service + "\u{0}" + key], stored.state == record.state, stored.updatedAt == record.updatedAt
            else { return false }
            state.idempotency[service + "\u{0}" + key]?.state = .inFlight
            state.idempotency[service + "\u{0}" + key]?.updatedAt = at
            return true
        }
    }

    package func settleIdempotencyKey(service: String, key: String, state newState: IdempotencyRecord.State, at: UnixTime) async throws {
        try write { state in
            state.idempotency[service + "\u{0}" + key]?.state = newState
            state.idempotency[service + "\u{0}" + key]?.updatedAt = at
        }
    }

    package func pruneIdempotencyKeys(before: UnixTime, limit: Int) async throws -> Int {
        try write { state in
            let old = state.idempotency.filter { $0.value.createdAt < before }.keys.prefix(limit)
            for key in old { state.idempotency[key] = nil }
            return old.count
        }
    }

    package func checkWritable(at: UnixTime) async throws {
        try write { _ in }
    }
}
