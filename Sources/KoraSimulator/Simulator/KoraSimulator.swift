import Crypto
import KoraSidecar
import KoraSidecarCore
import NIOConcurrencyHelpers

/// A local stand-in for the Kora IDV API (KORA.md): in-memory verifications and alerts, sandbox
/// outcomes by `externalId` prefix, timestamped-signed webhooks to the callback and dashboard URLs.
///
/// Serve it with ``buildSimulator(_:logger:onListening:)``; tests and the demo keep the object to
/// look at what it holds and what it sent.
package final class KoraSimulator: Sendable {
    /// How it was configured.
    package let configuration: SimulatorConfiguration
    /// Every webhook attempt, in order; wait on it instead of sleeping.
    package let sent = ObservedLog<SentWebhook>()

    let state = NIOLockedValueBox(State())
    /// Signs the image URLs it hands out; new each run, as a URL outlives no restart of the stand-in.
    let imageURLKey = SymmetricKey(size: .bits256)
    let jobs: AsyncStream<SimulatorJob>
    private let jobInput: AsyncStream<SimulatorJob>.Continuation

    /// The mutable part, behind one lock.
    struct State {
        var verifications: [String: SimulatedVerification] = [:]
        var order: [String] = []
        var alerts: [String: SimulatedAlert] = [:]
        var alertOrder: [String] = []
        var dashboardURL: String?
        var window = (minute: Int64(0), count: 0)
        var livenessSessions = 0
    }

    /// A simulator that has not started serving yet.
    package init(configuration: SimulatorConfiguration) {
        self.configuration = configuration
        (jobs, jobInput) = AsyncStream.makeStream(of: SimulatorJob.self)
        state.withLockedValue { $0.dashboardURL = configuration.webhookURL }
    }

    deinit { jobInput.finish() }

    /// Sets the tenant-wide webhook URL, as one does in Kora's dashboard (the demo learns the
    /// sidecar's port only after the simulator started).
    func setDashboardWebhookURL(_ url: String?) {
        state.withLockedValue { $0.dashboardURL = url }
    }

    /// The verification `id` as the API answers it, if it exists.
    package func verification(_ id: String) -> JSONValue? {
        state.withLockedValue { $0.verifications[id]?.json }
    }

    /// The uploads accepted for verification `id`, by kind (`document`, `document/back`, `selfie`,
    /// `liveness/frames`).
    func uploads(of id: String) -> [String: SimulatedUpload] {
        state.withLockedValue { $0.verifications[id]?.uploads ?? [:] }
    }

    /// Every fraud alert as the API answers it.
    func alerts() -> [JSONValue] {
        state.withLockedValue { state in state.alertOrder.compactMap { state.alerts[$0]?.json } }
    }

    func schedule(_ job: SimulatorJob) {
        jobInput.yield(job)
    }

    // MARK: Transitions

    /// Creates a verification; schedules its auto-completion when configured.
    func create(
        externalID: String, tier: String, tenantID: String, callbackURL: String?, documentType: String?, metadata: JSONValue?
    ) -> SimulatedVerification {
        let now = configuration.clock()
        let verification = SimulatedVerification(
            id: "ver_" + RandomID.make() + RandomID.make(), tenantID: tenantID, externalID: externalID, tier: tier,
            callbackURL: callbackURL, documentType: documentType, metadata: metadata, createdAt: now, updatedAt: now,
            expiresAt: now.adding(.seconds(24 * 3600)))
        state.withLockedValue { state in
            state.verifications[verification.id] = verification
            state.order.append(verification.id)
        }
        if let delay = configuration.autoComplete { schedule(.later(delay, id: verification.id, .complete)) }
        return verification
    }

    /// Starts processing: decides at once, or later for `test-slow-`. Nil when there is no such
    /// verification; throws when it is not pending.
    func complete(_ id: String) throws(SidecarHTTPError) -> JSONValue? {
        let now = configuration.clock()
        let result: Result<(SimulatedVerification, [SimulatorJob])?, SidecarHTTPError> = state.withLockedValue { state in
            guard var verification = state.verifications[id] else { return .success(nil) }
            guard verification.status == "pending" else {
                return .failure(Self.invalidState("Verification is \(verification.status); only a pending verification can be completed."))
            }
            if verification.outcome == .slow {
                verification.status = "processing"
                verification.updatedAt = now
                state.verifications[id] = verification
                return .success((verification, [.later(configuration.slowDelay, id: id, .decide)]))
            }
            return .success(Self.decide(&state, id: id, now: now, configuration: configuration))
        }
        guard let (verification, jobs) = try result.get() else { return nil }
        jobs.forEach(schedule)
        return verification.json
    }

    /// Runs a delayed step; answers the jobs that follow from it.
    func perform(_ action: SimulatorJob.Later, id: String) -> [SimulatorJob] {
        let now = configuration.clock()
        switch action {
        case .complete:
            _ = try? complete(id)  // schedules what follows itself; a verification already completed stays as it is
            return []
        case .decide:
            return state.withLockedValue { state in
                guard state.verifications[id]?.status == "processing" else { return [] }
                return Self.decide(&state, id: id, now: now, configuration: configuration)?.1 ?? []
            }
        case .expire:
            return state.withLockedValue { state in
                guard var verification = state.verifications[id], verification.status == "verified" else { return [] }
                // The approval no longer holds: without a decision, receivers read the status (expired).
                verification.status = "expired"
                verification.decision = nil
                verification.decisionReason = "Verification expired"
                verification.updatedAt = now
                verification.expiresAt = now
                state.verifications[id] = verification
                let event = PreparedEvent(type: "verification.expired", verification: verification, data: verification.eventData, at: now)
                return [Self.delivery([event], for: verification, state: state)]
            }
        }
    }

    /// Applies the sandbox outcome to a pending or processing verification.
    private static func decide(
        _ state: inout State, id: String, now: UnixTime, configuration: SimulatorConfiguration
    ) -> (SimulatedVerification, [SimulatorJob])? {
        guard var verification = state.verifications[id] else { return nil }
        var events: [PreparedEvent] = []
        var jobs: [SimulatorJob] = []
        verification.updatedAt = now
        switch verification.outcome {
        case .approve, .slow, .expired:
            (verification.status, verification.decision, verification.decisionReason, verification.overallScore) =
                ("verified", "auto_approve", "All checks passed", "96.3")
            if verification.outcome == .expired { jobs.append(.later(configuration.expiryDelay, id: id, .expire)) }
        case .reject:
            (verification.status, verification.decision, verification.decisionReason, verification.overallScore) =
                ("rejected", "auto_reject", "Document authenticity check failed", "12.5")
        case .review:
            (verification.status, verification.decision, verification.decisionReason, verification.overallScore) =
                ("manual_review", "manual_review", "Face match below auto-approve threshold", "61.0")
        case .fraud:
            (verification.status, verification.decision, verification.decisionReason, verification.overallScore) =
                ("rejected", "auto_reject", "Fraud alert: document shows signs of digital alteration", "8.1")
            let alert = SimulatedAlert(
                id: "alert_" + RandomID.make(), verificationID: id, externalID: verification.externalID, createdAt: now)
            state.alerts[alert.id] = alert
            state.alertOrder.append(alert.id)
            events.append(PreparedEvent(type: "fraud_alert.created", verification: verification, data: alert.json, resourceID: alert.id, at: now))
        }
        events += decisionEvents(verification, at: now)
        state.verifications[id] = verification
        // What follows the decision (an expiry) starts once its events were sent: at Kora an approval
        // expires long after its webhook, so a slow first send must not let the expiry overtake it.
        return (verification, [.sequence([delivery(events, for: verification, state: state)] + jobs)])
    }

    /// The events of an automatic decision (KORA.md §3): `verification.completed` with the decision in
    /// its `data` (what the integration guide's handlers switch on), then `verification.verified` or
    /// `verification.rejected` for the services that listen to those only; a manual review is
    /// completed and neither yet. Kora does not say whether one decision sends both: this is our reading.
    private static func decisionEvents(_ verification: SimulatedVerification, at now: UnixTime) -> [PreparedEvent] {
        var types = ["verification.completed"]
        switch verification.status {
        case "verified": types.append("verification.verified")
        case "rejected": types.append("verification.rejected")
        default: break
        }
        return types.map { PreparedEvent(type: $0, verification: verification, data: verification.eventData, at: now) }
    }

    /// Manual review of a verification in `manual_review`.
    func review(_ id: String, approve: Bool, reviewer: String, notes: String?) throws(SidecarHTTPError) -> JSONValue? {
        let now = configuration.clock()
        let result: Result<(SimulatedVerification, SimulatorJob)?, SidecarHTTPError> = state.withLockedValue { state in
            guard var verification = state.verifications[id] else { return .success(nil) }
            guard verification.status == "manual_review" else {
                return .failure(Self.invalidState("Verification is \(verification.status); only one in manual_review can be reviewed."))
            }
            verification.status = approve ? "verified" : "rejected"
            verification.decision = approve ? "approve" : "reject"
            verification.decisionReason = "Manual review by \(reviewer)" + (notes.map { ": " + $0 } ?? "")
            verification.updatedAt = now
            state.verifications[id] = verification
            let event = PreparedEvent(
                type: approve ? "verification.verified" : "verification.rejected", verification: verification,
                data: verification.eventData, at: now)
            return .success((verification, Self.delivery([event], for: verification, state: state)))
        }
        guard let (verification, job) = try result.get() else { return nil }
        schedule(job)
        return verification.json
    }

    /// Sends `events` to the verification's callback URL and to the dashboard URL, both when both
    /// are set (as Kora does, so the same event arrives twice).
    private static func delivery(_ events: [PreparedEvent], for verification: SimulatedVerification, state: State) -> SimulatorJob {
        var targets: [WebhookTarget] = []
        if let url = verification.callbackURL { targets.append(.init(url: url, destination: .callbackURL)) }
        if let url = state.dashboardURL { targets.append(.init(url: url, destination: .dashboardURL)) }
        return .deliver(events, targets: targets)
    }

    static func invalidState(_ message: String) -> SidecarHTTPError {
        SidecarHTTPError(.conflict, code: "INVALID_STATE", message: message)
    }

    // MARK: Rate limit

    /// Counts one request in the current minute; answers the `X-RateLimit-*` values and, when the
    /// limit is spent, the seconds until the window resets.
    func countRequest() -> (limit: Int, remaining: Int, reset: Int64, retryAfter: Int64?) {
        let limit = configuration.rateLimitPerMinute
        let now = configuration.clock()
        let window = configuration.rateLimitWindowSeconds
        let minute = now.seconds / window
        let reset = (minute + 1) * window
        return state.withLockedValue { state in
            if state.window.minute != minute { state.window = (minute, 0) }
            state.window.count += 1
            let remaining = max(0, limit - state.window.count)
            let retryAfter = state.window.count > limit ? max(1, reset - now.seconds) : nil
            return (limit, remaining, reset, retryAfter)
        }
    }
}

/// Background work of the simulator: webhook sends and delayed steps.
enum SimulatorJob: Sendable {
    /// A delayed step of one verification.
    enum Later: Sendable {
        /// `--auto-complete`.
        case complete
        /// The decision of a `test-slow-` verification.
        case decide
        /// The expiry of a `test-expired-` verification.
        case expire
    }

    case deliver([PreparedEvent], targets: [WebhookTarget])
    case later(Duration, id: String, Later)
    /// Jobs done one after the other.
    indirect case sequence([SimulatorJob])
}

/// Where one webhook goes.
struct WebhookTarget: Sendable {
    var url: String
    var destination: WebhookDestination
}
