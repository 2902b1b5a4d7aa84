import KoraSidecarCore

/// Everything the sidecar keeps: de-duplication ids, the outbox of queued deliveries, quarantined
/// payloads and which service created each verification.
///
/// The dispatcher and the routes see only this protocol; SQLite implements it for production and
/// an in-memory store for unit tests, and a shared server database can implement it the same way.
package protocol SidecarStore: Sendable {
    /// Whether `eventID` was remembered at or after `since`.
    func isDuplicate(eventID: String, since: UnixTime) async throws -> Bool
    /// Remembers each id as seen at its time, in one transaction (direct mode, once every service
    /// took the event). An id given twice keeps its later time.
    func remember(_ seen: [(eventID: String, at: UnixTime)]) async throws
    /// In one transaction: unless `event.id` was seen at or after `dedupSince`, remembers it and
    /// stores the event with one pending delivery per service; with no service, the event is kept
    /// as unrouted (until ``route(_:at:)`` gives it deliveries or the de-duplication window ends).
    func enqueue(_ event: KoraEvent, services: [String], at: UnixTime, dedupSince: UnixTime) async throws -> EnqueueResult
    /// Keeps a signed payload that could not be parsed.
    func quarantine(_ payload: QuarantinedPayload) async throws
    /// Remembers that `service` created verification `verificationID`, unless an origin is recorded
    /// for it already: the first one is kept, so that no service's record replaces another's (with
    /// `onlyOwnVerifications`, that would move the verification, its events and its calls to it).
    func recordOrigin(verificationID: String, service: String, at: UnixTime) async throws
    /// The service that created `verificationID`, if known.
    func origin(ofVerification verificationID: String) async throws -> String?

    /// Leases up to `limit` pending deliveries of `service` that are due at `now`, oldest first;
    /// a lease not finished within `lease` makes the delivery due again. `ordered`: a delivery
    /// whose verification has an earlier delivery still pending for the service is not due yet.
    func claimDue(service: String, now: UnixTime, limit: Int, lease: Duration, ordered: Bool) async throws -> [DeliveryJob]
    /// Records one attempt of a leased delivery and what follows from it, if the lease that ends at
    /// `leasedUntil` still holds it (the claim's ``DeliveryJob/leaseUntil``). A lease that ran out
    /// and was taken by another worker (a stalled process, a replica's clock) is that worker's now:
    /// a late result recorded over its own would undo a delivery or kill a live one.
    /// `announcing`, an operational event about the result, is stored in the same transaction, and
    /// only if the result is: an erasure either removes both or finds the delivery gone (and nothing
    /// is announced), never leaves an announcement about what it erased.
    /// - Returns: whether it was recorded (not when the lease had passed on, or an erasure removed
    ///   the delivery while it was being sent).
    @discardableResult
    func finish(deliveryID: Int64, leasedUntil: UnixTime, attempt: AttemptRecord, next: NextStep, announcing: Announcement?) async throws -> Bool
    /// ``finish(deliveryID:leasedUntil:attempt:next:)``, then ``claimDue(service:now:limit:lease:ordered:)``
    /// of one delivery: a busy worker's two calls per delivery, as one transaction where the store can.
    func finishAndClaimNext(
        deliveryID: Int64, leasedUntil: UnixTime, attempt: AttemptRecord, next: NextStep, service: String, now: UnixTime, lease: Duration,
        ordered: Bool
    ) async throws -> (recorded: Bool, next: DeliveryJob?)
    /// When the next pending delivery of `service` becomes due (`ordered`: not counting those
    /// waiting behind an earlier delivery of their verification), if any.
    func nextDueTime(service: String, ordered: Bool) async throws -> UnixTime?
    /// Ends every lease: at start-up of a store that only this process uses.
    func releaseLeases() async throws

    /// Deliveries that `query` selects, newest first.
    func deliveries(_ query: DeliveryQuery) async throws -> [DeliverySummary]
    /// One delivery with its attempt history and its event's body, opened.
    func delivery(id: Int64) async throws -> DeliveryDetail?
    /// Quarantined payloads, newest first.
    func quarantined(limit: Int) async throws -> [QuarantinedPayload]
    /// How many quarantined payloads are kept.
    func quarantinedCount() async throws -> Int
    /// Events that matched no service, newest first (`limit` nil: all of them).
    func unrouted(limit: Int?) async throws -> [UnroutedEvent]
    /// How many unrouted events are kept.
    func unroutedCount() async throws -> Int
    /// Gives each listed unrouted event one pending delivery per service, due at `at`, and ends its
    /// unrouted state, in one transaction; an event with no service, or no longer unrouted (another
    /// process routed it), is left as it is. Returns the deliveries created.
    func route(_ assignments: [(eventRow: Int64, services: [String])], at: UnixTime) async throws -> Int
    /// Makes a dead (or pending) delivery due at `at` again; false when there is no such delivery,
    /// it was delivered, or its event's body is gone.
    func requeue(id: Int64, at: UnixTime) async throws -> Bool
    /// Makes every delivery `filter` selects whose event still has its body due at `at` again (its
    /// next attempt keeps the event's id and counts on); with `dryRun`, changes nothing. Returns
    /// how many it selects, and how many it left because their body is gone.
    func requeue(_ filter: DeliveryFilter, at: UnixTime, dryRun: Bool) async throws -> RequeueCount
    /// Deletes delivered deliveries (and their events once no delivery needs them) finished before
    /// `deliveredBefore`, and de-duplication ids and quarantined payloads from before `seenBefore`:
    /// at most `limit` rows of each table, so that no call holds the store (or outlasts a
    /// PostgreSQL operation's time-out, which would undo it every time); ``PruneResult/more`` says
    /// whether there may be more.
    func prune(deliveredBefore: UnixTime, seenBefore: UnixTime, limit: Int) async throws -> PruneResult
    /// Deletes the bodies of up to `limit` events none of whose deliveries is pending, once their
    /// last delivery ended before `deliveredBefore` (all delivered) or `deadBefore` (some dead);
    /// their metadata stays. Returns how many bodies it deleted (`limit`: call again).
    func expireBodies(deliveredBefore: UnixTime, deadBefore: UnixTime, limit: Int) async throws -> Int
    /// Up to `limit` kept event bodies after event row `after`, opened, and the last row read (nil:
    /// none left): an operator's search for what to erase, a page at a time.
    func keptEvents(after: Int64, limit: Int) async throws -> (bodies: [KeptBody], last: Int64?)
    /// Every kept quarantined payload, opened.
    func keptQuarantined() async throws -> [KeptBody]
    /// In one transaction, deletes everything stored about `verificationIDs` (events and their
    /// deliveries and attempts, origin records), the events `eventIDs` that are about no
    /// verification (a fraud alert, say) with their deliveries and attempts, the quarantined payloads
    /// `quarantineIDs`, and the idempotency records whose stored answer contains one of `mentions`.
    /// De-duplication ids stay, so that Kora's retry of an erased event is not stored again.
    func erase(verificationIDs: [String], eventIDs: [String], quarantineIDs: [Int64], mentions: [[UInt8]]) async throws -> ErasureReport
    /// Seals again, with the first key, up to 200 kept event bodies sealed under another key (or
    /// none) after event row `after`, in one transaction; returns what it did and the last row it
    /// looked at (nil: none left).
    func resealEvents(after: Int64) async throws -> (report: ResealReport, last: Int64?)
    /// Seals again, with the first key, every kept quarantined payload sealed under another key.
    func resealQuarantined() async throws -> ResealReport
    /// Outbox depth by service and status, with the age of the oldest pending delivery.
    func depth() async throws -> [OutboxDepth]
    /// The `Idempotency-Key` record of `service`'s `key`, if any.
    func idempotencyRecord(service: String, key: String) async throws -> IdempotencyRecord?
    /// Claims `service`'s `key` for a create whose body has `digest`: nil when this caller claimed it
    /// (the record is now in flight), else the record another call left (atomic across replicas).
    func claimIdempotencyKey(service: String, key: String, digest: String, at: UnixTime) async throws -> IdempotencyRecord?
    /// Makes `service`'s `key` in flight again for this caller, if it is still as `record` found it
    /// (unknown, or in flight for too long): true when this caller took it over, false when another
    /// did first (atomic across replicas), so that one repeat only sends the create again.
    func takeOverIdempotencyKey(service: String, key: String, from record: IdempotencyRecord, at: UnixTime) async throws -> Bool
    /// Sets the state of `service`'s `key` at `at`.
    func settleIdempotencyKey(service: String, key: String, state: IdempotencyRecord.State, at: UnixTime) async throws
    /// Deletes at most `limit` idempotency records created before `before`; returns how many.
    func pruneIdempotencyKeys(before: UnixTime, limit: Int) async throws -> Int

    /// Performs a small write, to prove the store accepts writes (readiness).
    func checkWritable(at: UnixTime) async throws
}

/// What ``SidecarStore/enqueue(_:services:at:dedupSince:)`` did.
package enum EnqueueResult: Sendable, Equatable {
    case accepted
    case duplicate
}

/// Where a delivery stands.
package enum DeliveryStatus: String, Sendable, CaseIterable {
    case pending
    case delivered
    case dead
}

/// A leased delivery, with the event to send.
package struct DeliveryJob: Sendable {
    package var deliveryID: Int64
    package var service: String
    /// The number of this attempt, from 1.
    package var attempt: Int
    package var event: KoraEvent
    /// Why the event's body could not be read; such a job is not sent.
    package var bodyProblem: BodyProblem?
    /// When the claim's lease ends: the fence its attempt is recorded under.
    package var leaseUntil: UnixTime

    package init(deliveryID: Int64, service: String, attempt: Int, event: KoraEvent, bodyProblem: BodyProblem? = nil, leaseUntil: UnixTime) {
        self.deliveryID = deliveryID
        self.service = service
        self.attempt = attempt
        self.event = event
        self.bodyProblem = bodyProblem
        self.leaseUntil = leaseUntil
    }
}

/// One attempt to deliver.
package struct AttemptRecord: Sendable, Equatable {
    package var attempt: Int
    package var at: UnixTime
    /// The service's HTTP status, when it answered.
    package var statusCode: Int?
    /// What went wrong, when it did (never a secret).
    package var error: String?
    var durationMilliseconds: Int

    package init(attempt: Int, at: UnixTime, statusCode: Int?, error: String?, durationMilliseconds: Int) {
        self.attempt = attempt
        self.at = at
        self.statusCode = statusCode
        self.error = error
        self.durationMilliseconds = durationMilliseconds
    }
}

/// What happens to a delivery after an attempt.
package enum NextStep: Sendable, Equatable {
    case delivered
    case retry(at: UnixTime)
    case dead
}

extension NextStep {
    /// The delivery's status after an attempt, and when it is next due (or when it ended).
    func statusAndTime(after attempt: AttemptRecord) -> (DeliveryStatus, Int64) {
        switch self {
        case .delivered: (.delivered, attempt.at.milliseconds)
        case .retry(let at): (.pending, at.milliseconds)
        case .dead: (.dead, attempt.at.milliseconds)
        }
    }
}

/// One delivery, as operators list it.
package struct DeliverySummary: Sendable, Equatable {
    package var id: Int64
    package var eventID: String
    package var eventType: String
    package var service: String
    package var status: DeliveryStatus
    package var attempts: Int
    package var nextAttemptAt: UnixTime?
    package var lastStatusCode: Int?
    package var lastError: String?
    package var createdAt: UnixTime
    package var updatedAt: UnixTime
    package var verificationID: String?

    package init(
        id: Int64, eventID: String, eventType: String, service: String, status: DeliveryStatus, attempts: Int, nextAttemptAt: UnixTime?,
        lastStatusCode: Int?, lastError: String?, createdAt: UnixTime, updatedAt: UnixTime, verificationID: String? = nil
    ) {
        self.id = id
        self.eventID = eventID
        self.eventType = eventType
        self.service = service
        self.status = status
        self.attempts = attempts
        self.nextAttemptAt = nextAttemptAt
        self.lastStatusCode = lastStatusCode
        self.lastError = lastError
        self.createdAt = createdAt
        self.updatedAt = updatedAt
        self.verificationID = verificationID
    }
}

/// One delivery with every attempt, and its event's body when the store still has it.
package struct DeliveryDetail: Sendable, Equatable {
    package var summary: DeliverySummary
    package var attempts: [AttemptRecord]
    /// The event, or why its body is gone.
    package var event: Result<KoraEvent, BodyProblem>

    package init(summary: DeliverySummary, attempts: [AttemptRecord], event: Result<KoraEvent, BodyProblem>) {
        self.summary = summary
        self.attempts = attempts
        self.event = event
    }
}

/// An operational event to store with a delivery's result, for `services`.
package struct Announcement: Sendable {
    package var event: KoraEvent
    package var services: [String]
}

/// Which deliveries an operator lists: `filter` (no status: every status), older than the
/// delivery `before` (paging), at most `limit`.
package struct DeliveryQuery: Sendable, Equatable {
    package var filter: DeliveryFilter
    package var before: Int64?
    package var limit: Int

    package init(filter: DeliveryFilter = DeliveryFilter(statuses: []), before: Int64? = nil, limit: Int) {
        self.filter = filter
        self.before = before
        self.limit = limit
    }
}

/// What a bulk requeue selected, and what it left because the body is gone.
package struct RequeueCount: Sendable, Equatable {
    package var selected: Int
    package var bodyGone: Int

    package init(selected: Int, bodyGone: Int) {
        self.selected = selected
        self.bodyGone = bodyGone
    }
}

/// A body the store still keeps, opened, and what it belongs to.
package struct KeptBody: Sendable {
    package enum Owner: Sendable, Equatable {
        /// An event (its normalised body), by its id, about a verification or none.
        case event(id: String, verificationID: String?)
        /// A quarantined payload, by its row.
        case quarantine(Int64)
    }

    package var owner: Owner
    package var body: [UInt8]

    package init(owner: Owner, body: [UInt8]) {
        self.owner = owner
        self.body = body
    }
}

/// What an erasure removed.
package struct ErasureReport: Sendable, Equatable {
    package var verificationIDs: [String]
    package var events = 0
    package var deliveries = 0
    package var quarantined = 0
    package var origins = 0
    package var idempotencyKeys = 0

    package init(verificationIDs: [String]) { self.verificationIDs = verificationIDs }
}

/// What re-sealing did.
package struct ResealReport: Sendable, Equatable {
    package var resealed = 0
    /// Bodies that no configured key opens: left as they are.
    package var unreadable = 0

    package init(resealed: Int = 0, unreadable: Int = 0) {
        self.resealed = resealed
        self.unreadable = unreadable
    }

    static func + (lhs: ResealReport, rhs: ResealReport) -> ResealReport {
        ResealReport(resealed: lhs.resealed + rhs.resealed, unreadable: lhs.unreadable + rhs.unreadable)
    }
}

/// A signed payload that could not be normalised.
package struct QuarantinedPayload: Sendable, Equatable {
    package var id: Int64
    package var receivedAt: UnixTime
    package var reason: String
    package var body: [UInt8]
    /// Kora's signature and id headers as received.
    package var headers: [String: String]
    package var signatureVerified: Bool
    /// Why the body and headers are not there (erased, or sealed under a key that is not configured).
    package var bodyProblem: BodyProblem?

    package init(id: Int64 = 0, receivedAt: UnixTime, reason: String, body: [UInt8], headers: [String: String], signatureVerified: Bool) {
        self.id = id
        self.receivedAt = receivedAt
        self.reason = reason
        self.body = body
        self.headers = headers
        self.signatureVerified = signatureVerified
    }
}

/// What the store keeps of a verification create sent with `Idempotency-Key`.
package struct IdempotencyRecord: Sendable, Equatable {
    /// Where the create stands.
    package enum State: Sendable, Equatable {
        /// Being sent now (by this or another replica).
        case inFlight
        /// Sent, with no answer known (a time-out, a lost connection, a 5xx): Kora may have created it.
        case unknown
        /// Kora's answer, returned to every repeat.
        case answered(status: Int, contentType: String?, body: [UInt8])

        /// The name stored in the database.
        var name: String {
            switch self {
            case .inFlight: "in_flight"
            case .unknown: "unknown"
            case .answered: "answered"
            }
        }
    }

    /// The digest of the first call's body: a repeat with another body reuses the key by mistake.
    package var digest: String
    package var state: State
    /// When the first call was made.
    package var createdAt: UnixTime
    /// When the state last changed.
    package var updatedAt: UnixTime

    package init(digest: String, state: State, createdAt: UnixTime, updatedAt: UnixTime) {
        self.digest = digest
        self.state = state
        self.createdAt = createdAt
        self.updatedAt = updatedAt
    }

    /// The record from its stored columns.
    static func decode(
        digest: String, state: String, status: Int?, contentType: String?, body: [UInt8]?, createdAt: Int64, updatedAt: Int64
    ) -> IdempotencyRecord {
        let decoded: State =
            switch state {
            case "answered": .answered(status: status ?? 502, contentType: contentType, body: body ?? [])
            case "in_flight": .inFlight
            default: .unknown
            }
        return IdempotencyRecord(
            digest: digest, state: decoded, createdAt: UnixTime(milliseconds: createdAt), updatedAt: UnixTime(milliseconds: updatedAt))
    }
}

/// Which deliveries an operator lists or re-queues: every given condition holds.
package struct DeliveryFilter: Sendable, Equatable {
    /// The statuses selected (a listing selects every status when empty; a requeue names them).
    package var statuses: [DeliveryStatus]
    package var service: String?
    package var eventType: String?
    package var verificationID: String?
    package var eventID: String?
    /// Accepted at or after.
    package var since: UnixTime?
    /// Accepted before.
    package var until: UnixTime?

    package init(
        statuses: [DeliveryStatus], service: String? = nil, eventType: String? = nil, verificationID: String? = nil, eventID: String? = nil,
        since: UnixTime? = nil, until: UnixTime? = nil
    ) {
        self.statuses = statuses
        self.service = service
        self.eventType = eventType
        self.verificationID = verificationID
        self.eventID = eventID
        self.since = since
        self.until = until
    }

    /// Whether an event of `type` about `verificationID`, accepted at `at`, passes the conditions
    /// on events (unrouted events have no service or status).
    package func selectsEvent(type: String, verificationID: String?, eventID: String, at: UnixTime) -> Bool {
        (eventType.map { $0 == type } ?? true) && (self.verificationID.map { $0 == verificationID } ?? true)
            && (self.eventID.map { $0 == eventID } ?? true) && (since.map { at >= $0 } ?? true) && (until.map { at < $0 } ?? true)
    }
}

/// An accepted event that matched no service's `events` filter, kept so that an operator can route
/// it once the configuration changed.
package struct UnroutedEvent: Sendable, Equatable {
    /// The store's row of the event (listed as `u<row>`).
    package var row: Int64
    package var eventID: String
    package var eventType: String
    package var verificationID: String?
    package var receivedAt: UnixTime
    package var signatureVerified: Bool

    package init(row: Int64, eventID: String, eventType: String, verificationID: String?, receivedAt: UnixTime, signatureVerified: Bool) {
        self.row = row
        self.eventID = eventID
        self.eventType = eventType
        self.verificationID = verificationID
        self.receivedAt = receivedAt
        self.signatureVerified = signatureVerified
    }
}

/// How much a prune removed.
package struct PruneResult: Sendable, Equatable {
    package var deliveries: Int
    package var seenIDs: Int
    /// Whether a table had `limit` rows to delete: another call may find more.
    package var more: Bool

    package init(deliveries: Int, seenIDs: Int, more: Bool = false) {
        self.deliveries = deliveries
        self.seenIDs = seenIDs
        self.more = more
    }
}

/// The outbox of one service in one status.
package struct OutboxDepth: Sendable, Equatable {
    package var service: String
    package var status: DeliveryStatus
    package var count: Int
    /// Pending deliveries only: since when the oldest has waited, its creation or the last time an
    /// operator made it pending again (a re-queued delivery of last week has not waited a week).
    package var oldestSince: UnixTime?

    package init(service: String, status: DeliveryStatus, count: Int, oldestSince: UnixTime?) {
        self.service = service
        self.status = status
        self.count = count
        self.oldestSince = oldestSince
    }
}

/// SQL the SQLite and PostgreSQL stores share.
enum OutboxSQL {
    /// The assignments that make a delivery pending again at `time` (a parameter or a literal).
    /// Every right-hand side reads the row as it was. A lease a worker holds now is kept: the delivery
    /// being sent stays with that worker, or another one would send it at the same time (the attempt's
    /// outcome then decides what follows). `pending_since` moves only when it was not pending already.
    static func requeue(at time: String) -> String {
        """
        status = 'pending', next_attempt_at = \(time), lease_until = CASE WHEN lease_until > \(time) THEN lease_until END,
            updated_at = \(time), pending_since = CASE WHEN status = 'pending' THEN pending_since ELSE \(time) END
        """
    }
}

extension SidecarStore {
    /// ``finish(deliveryID:leasedUntil:attempt:next:announcing:)`` announcing nothing.
    @discardableResult
    func finish(deliveryID: Int64, leasedUntil: UnixTime, attempt: AttemptRecord, next: NextStep) async throws -> Bool {
        try await finish(deliveryID: deliveryID, leasedUntil: leasedUntil, attempt: attempt, next: next, announcing: nil)
    }

    /// Whether any of an event's de-duplication `keys` was seen at or after `since`.
    func hasSeen(any keys: [String], since: UnixTime) async throws -> Bool {
        for key in keys where try await isDuplicate(eventID: key, since: since) { return true }
        return false
    }

    package func finishAndClaimNext(
        deliveryID: Int64, leasedUntil: UnixTime, attempt: AttemptRecord, next: NextStep, service: String, now: UnixTime, lease: Duration,
        ordered: Bool
    ) async throws -> (recorded: Bool, next: DeliveryJob?) {
        let recorded = try await finish(deliveryID: deliveryID, leasedUntil: leasedUntil, attempt: attempt, next: next)
        // The attempt is recorded: a claim failing now only means no next delivery at once (the
        // worker's next look finds it). Thrown, it made the recorded attempt look unrecorded, and a
        // dead outcome went unlogged and unannounced.
        let claimed = try? await claimDue(service: service, now: now, limit: 1, lease: lease, ordered: ordered).first
        return (recorded, claimed ?? nil)
    }

    /// Seals every kept body again with the first key, in batches so that serve's writes interleave.
    package func reseal() async throws -> ResealReport {
        var report = ResealReport()
        var after: Int64 = 0
        while true {
            let batch = try await resealEvents(after: after)
            report = report + batch.report
            guard let last = batch.last else { break }
            after = last
        }
        return report + (try await resealQuarantined())
    }

    /// The newest `limit` deliveries, optionally of one status.
    package func deliveries(status: DeliveryStatus?, limit: Int) async throws -> [DeliverySummary] {
        try await deliveries(DeliveryQuery(filter: DeliveryFilter(statuses: status.map { [$0] } ?? []), limit: limit))
    }

    /// ``claimDue(service:now:limit:lease:ordered:)`` in due order alone.
    package func claimDue(service: String, now: UnixTime, limit: Int, lease: Duration) async throws -> [DeliveryJob] {
        try await claimDue(service: service, now: now, limit: limit, lease: lease, ordered: false)
    }
}
