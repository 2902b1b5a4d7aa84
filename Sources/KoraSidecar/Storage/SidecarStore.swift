/// Everything the sidecar keeps: de-duplication ids, the outbox of queued deliveries, quarantined
/// payloads and which service created each verification.
///
/// The dispatcher and the routes see only this protocol; SQLite implements it for production and
/// an in-memory store for unit tests, and a shared server database can implement it the same way.
public protocol SidecarStore: Sendable {
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
    /// Remembers that `service` created verification `verificationID`.
    func recordOrigin(verificationID: String, service: String, at: UnixTime) async throws
    /// The service that created `verificationID`, if known.
    func origin(ofVerification verificationID: String) async throws -> String?

    /// Leases up to `limit` pending deliveries of `service` that are due at `now`, oldest first;
    /// a lease not finished within `lease` makes the delivery due again.
    func claimDue(service: String, now: UnixTime, limit: Int, lease: Duration) async throws -> [DeliveryJob]
    /// Records one attempt of a leased delivery and what follows from it.
    func finish(deliveryID: Int64, attempt: AttemptRecord, next: NextStep) async throws
    /// ``finish(deliveryID:attempt:next:)``, then ``claimDue(service:now:limit:lease:)`` of one
    /// delivery: a busy worker's two calls per delivery, as one transaction where the store can.
    func finishAndClaimNext(
        deliveryID: Int64, attempt: AttemptRecord, next: NextStep, service: String, now: UnixTime, lease: Duration
    ) async throws -> DeliveryJob?
    /// When the next pending delivery of `service` becomes due, if any.
    func nextDueTime(service: String) async throws -> UnixTime?
    /// Ends every lease: at start-up of a store that only this process uses.
    func releaseLeases() async throws

    /// Deliveries, newest first, optionally of one status.
    func deliveries(status: DeliveryStatus?, limit: Int) async throws -> [DeliverySummary]
    /// One delivery with its attempt history.
    func delivery(id: Int64) async throws -> DeliveryDetail?
    /// Quarantined payloads, newest first.
    func quarantined(limit: Int) async throws -> [QuarantinedPayload]
    /// Events that matched no service, newest first (`limit` nil: all of them).
    func unrouted(limit: Int?) async throws -> [UnroutedEvent]
    /// How many unrouted events are kept.
    func unroutedCount() async throws -> Int
    /// Gives each listed unrouted event one pending delivery per service, due at `at`, and ends its
    /// unrouted state, in one transaction; an event with no service, or no longer unrouted (another
    /// process routed it), is left as it is. Returns the deliveries created.
    func route(_ assignments: [(eventRow: Int64, services: [String])], at: UnixTime) async throws -> Int
    /// Makes a dead (or pending) delivery due at `at` again; false when there is no such delivery
    /// or it was delivered.
    func requeue(id: Int64, at: UnixTime) async throws -> Bool
    /// Makes every dead delivery due at `at`; returns how many.
    func requeueAllDead(at: UnixTime) async throws -> Int
    /// Deletes delivered deliveries (and their events once no delivery needs them) finished before
    /// `deliveredBefore`, and de-duplication ids seen before `seenBefore`.
    func prune(deliveredBefore: UnixTime, seenBefore: UnixTime) async throws -> PruneResult
    /// Outbox depth by service and status, with the age of the oldest pending delivery.
    func depth() async throws -> [OutboxDepth]
    /// Performs a small write, to prove the store accepts writes (readiness).
    func checkWritable(at: UnixTime) async throws
}

/// What ``SidecarStore/enqueue(_:services:at:dedupSince:)`` did.
public enum EnqueueResult: Sendable, Equatable {
    case accepted
    case duplicate
}

/// Where a delivery stands.
public enum DeliveryStatus: String, Sendable, CaseIterable {
    case pending
    case delivered
    case dead
}

/// A leased delivery, with the event to send.
public struct DeliveryJob: Sendable {
    public var deliveryID: Int64
    public var service: String
    /// The number of this attempt, from 1.
    public var attempt: Int
    public var event: KoraEvent
}

/// One attempt to deliver.
public struct AttemptRecord: Sendable, Equatable {
    public var attempt: Int
    public var at: UnixTime
    /// The service's HTTP status, when it answered.
    public var statusCode: Int?
    /// What went wrong, when it did (never a secret).
    public var error: String?
    public var durationMilliseconds: Int

    public init(attempt: Int, at: UnixTime, statusCode: Int?, error: String?, durationMilliseconds: Int) {
        self.attempt = attempt
        self.at = at
        self.statusCode = statusCode
        self.error = error
        self.durationMilliseconds = durationMilliseconds
    }
}

/// What happens to a delivery after an attempt.
public enum NextStep: Sendable, Equatable {
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
public struct DeliverySummary: Sendable, Equatable {
    public var id: Int64
    public var eventID: String
    public var eventType: String
    public var service: String
    public var status: DeliveryStatus
    public var attempts: Int
    public var nextAttemptAt: UnixTime?
    public var lastStatusCode: Int?
    public var lastError: String?
    public var createdAt: UnixTime
    public var updatedAt: UnixTime
}

/// One delivery with every attempt.
public struct DeliveryDetail: Sendable, Equatable {
    public var summary: DeliverySummary
    public var attempts: [AttemptRecord]
}

/// A signed payload that could not be normalised.
public struct QuarantinedPayload: Sendable, Equatable {
    public var id: Int64
    public var receivedAt: UnixTime
    public var reason: String
    public var body: [UInt8]
    /// Kora's signature and id headers as received.
    public var headers: [String: String]
    public var signatureVerified: Bool

    public init(id: Int64 = 0, receivedAt: UnixTime, reason: String, body: [UInt8], headers: [String: String], signatureVerified: Bool) {
        self.id = id
        self.receivedAt = receivedAt
        self.reason = reason
        self.body = body
        self.headers = headers
        self.signatureVerified = signatureVerified
    }
}

/// An accepted event that matched no service's `events` filter, kept so that an operator can route
/// it once the configuration changed.
public struct UnroutedEvent: Sendable, Equatable {
    /// The store's row of the event (listed as `u<row>`).
    public var row: Int64
    public var eventID: String
    public var eventType: String
    public var verificationID: String?
    public var receivedAt: UnixTime
    public var signatureVerified: Bool
}

/// How much a prune removed.
public struct PruneResult: Sendable, Equatable {
    public var deliveries: Int
    public var seenIDs: Int
}

/// The outbox of one service in one status.
public struct OutboxDepth: Sendable, Equatable {
    public var service: String
    public var status: DeliveryStatus
    public var count: Int
    /// When the oldest delivery in this state was created.
    public var oldestCreatedAt: UnixTime?
}

extension SidecarStore {
    public func finishAndClaimNext(
        deliveryID: Int64, attempt: AttemptRecord, next: NextStep, service: String, now: UnixTime, lease: Duration
    ) async throws -> DeliveryJob? {
        try await finish(deliveryID: deliveryID, attempt: attempt, next: next)
        return try await claimDue(service: service, now: now, limit: 1, lease: lease).first
    }
}
