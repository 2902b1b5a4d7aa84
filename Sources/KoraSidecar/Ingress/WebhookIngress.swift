import HTTPTypes
import Hummingbird
import KoraSidecarCore
import Logging
import NIOConcurrencyHelpers
import NIOCore

/// The webhook route (SPEC §4), one pipeline that reads top to bottom: read the raw body within
/// its limits → verify the signature over those bytes → normalise (quarantining what cannot be
/// parsed) → hand to the delivery mode, which de-duplicates, routes and delivers or stores.
struct WebhookIngress: Sendable {
    private let configuration: WebhookConfiguration
    private let verifier: SignatureVerifier
    private let store: any SidecarStore
    private let router: EventRouter
    private let handoff: any EventHandoff
    private let clock: @Sendable () -> UnixTime
    private let metrics: SidecarMetrics
    private let logger: Logger
    /// The bytes of webhook bodies being received, at most ``BodyBudget/bytes(maxBodyBytes:)``.
    private let bodies: BodyBudget
    /// Refusals anyone on the internet can cause: logged at most once a second for each code.
    private let refusals = Dictionary(uniqueKeysWithValues: SignatureFailure.allCases.map { ($0, LogThrottle(every: .seconds(1))) })
    private let refusedBodies = LogThrottle(every: .seconds(1))

    init(
        configuration: WebhookConfiguration, store: any SidecarStore, router: EventRouter, handoff: any EventHandoff,
        clock: @escaping @Sendable () -> UnixTime = UnixTime.now, metrics: SidecarMetrics = SidecarMetrics(), logger: Logger
    ) {
        self.metrics = metrics
        self.configuration = configuration
        self.verifier = SignatureVerifier(
            secrets: configuration.secrets, schemes: configuration.schemes, toleranceSeconds: configuration.toleranceSeconds)
        self.store = store
        self.router = router
        self.handoff = handoff
        self.clock = clock
        self.logger = logger
        self.bodies = BodyBudget(bytes: BodyBudget.bytes(maxBodyBytes: configuration.limits.maxBodyBytes))
    }

    /// Header names read by the ingress.
    enum Header {
        static let signature = HTTPField.Name("X-Signature")!
        static let timestamp = HTTPField.Name("X-Timestamp")!
        static let algorithm = HTTPField.Name("X-Signature-Algorithm")!
        static let legacySignature = HTTPField.Name("X-Kora-Signature")!
        static let webhookID = HTTPField.Name("X-Webhook-ID")!
        static let eventType = HTTPField.Name("X-Event-Type")!
        /// Kora's headers forwarded with the `original` format and kept with quarantined payloads.
        static let original = [signature, timestamp, algorithm, legacySignature, webhookID, eventType]
    }

    /// Answers one `POST {webhooks.path}`.
    package func handle(_ request: Request, context: SidecarRequestContext) async -> Response {
        do {
            return try await accept(request, context: context)
        } catch {
            metrics.webhook(error.code, reason: error.unavailableReason?.rawValue)
            return error.response(channel: context.channel)
        }
    }

    private func accept(_ request: Request, context: SidecarRequestContext) async throws(SidecarHTTPError) -> Response {
        let signature = SignatureHeaders(
            signature: request.headers[Header.signature], timestamp: request.headers[Header.timestamp],
            algorithm: request.headers[Header.algorithm], legacySignature: request.headers[Header.legacySignature])
        // A body announced too large keeps its 413 (SPEC §4.1); neither case reads it.
        if configuration.enforce, let failure = verifier.failureBeforeBody(signature),
            !BodyReader.declaresMore(than: configuration.limits.maxBodyBytes, request)
        {
            throw refusal(failure, log: ["webhook.result": "\(failure.rawValue)"])
        }
        let buffer = try await BodyReader.collect(
            request, channel: context.channel, limit: configuration.limits.maxBodyBytes, budget: bodies, logger: logger,
            throttle: refusedBodies)
        let body = Array(buffer.readableBytesView)
        let now = clock()
        var log: Logger.Metadata = ["webhook.bytes": "\(body.count)"]
        let verdict = try await verify(body, signature, request.headers, at: now, &log)
        var unverified: SignatureFailure? = if case .failure(let failure) = verdict { failure } else { nil }
        var event = try await normalize(body, request.headers, verified: unverified == nil, at: now, &log)
        if case .success(.legacy) = verdict, let occurredAt = event.occurredAt, occurredAt < legacyHorizon(now) {
            unverified = try refuseTooOld(&event, &log)
        }
        let result = try await handoff.take(
            event, at: now, dedupSince: dedupSince(now), route: { try await router.recipients(of: event) }, log: log)
        return answer(result, unverified: unverified, log)
    }

    /// Checks the signature over the raw bytes: the scheme that holds, or the failure report-only
    /// mode lets through.
    /// - Throws: 401 with the failure's code when enforcing.
    private func verify(
        _ body: [UInt8], _ signature: SignatureHeaders, _ headers: HTTPFields, at now: UnixTime, _ log: inout Logger.Metadata
    ) async throws(SidecarHTTPError) -> Result<SignatureScheme, SignatureFailure> {
        switch verifier.verify(body: body, headers: signature, now: now.seconds) {
        case .success(let scheme):
            log["webhook.scheme"] = "\(scheme.rawValue)"
            return .success(scheme)
        case .failure(let failure):
            log["webhook.result"] = "\(failure.rawValue)"
            guard !configuration.enforce else {
                if failure == .staleTimestamp, verifier.isSignedOutsideWindow(body: body, headers: signature) {
                    await reportLate(body, headers, timestamp: signature.timestamp, at: now, log)
                }
                throw refusal(failure, log: log)
            }
            logger.warning("Webhook signature not verified; delivering anyway (report-only mode)", metadata: log)
            return .failure(failure)
        }
    }

    /// The 401 for a signature that does not hold, logged. The connection is closed with it: Kora
    /// never needs it again after a refusal, and an idle connection kept open would hold one of
    /// the listener's `maxConnections` for its idle time-out.
    private func refusal(_ failure: SignatureFailure, message: String? = nil, log: Logger.Metadata) -> SidecarHTTPError {
        refusals[failure]?.log(log) { logger.warning("Webhook rejected", metadata: $0) }
        return SidecarHTTPError(.unauthorized, code: failure.rawValue, message: message ?? failure.message, closeConnection: true)
    }

    /// A legacy signature has no time of its own: its webhook is judged by the time its signed body
    /// states (``KoraEvent/occurredAt``), and one the de-duplication window no longer covers could be
    /// a replay of one seen. Refused as stale; in report-only mode, delivered as unverified.
    /// Not reported as Kora's lost webhook: a replay of one captured long ago looks the same, and
    /// anyone holding one could raise that alert at will.
    private func refuseTooOld(_ event: inout KoraEvent, _ log: inout Logger.Metadata) throws(SidecarHTTPError) -> SignatureFailure {
        log["webhook.result"] = "\(SignatureFailure.staleTimestamp.rawValue)"
        log["webhook.reason"] = "legacy signature, stated time older than webhooks.dedupWindowHours"
        guard !configuration.enforce else { throw refusal(.staleTimestamp, message: Self.legacyTooOldMessage, log: log) }
        logger.warning("Webhook signature not verified; delivering anyway (report-only mode)", metadata: log)
        event.signatureVerified = false
        return .staleTimestamp
    }

    private static let legacyTooOldMessage =
        "The event's timestamp is older than the de-duplication window; a webhook signed with X-Kora-Signature that old is not accepted."

    /// The oldest time a legacy-signed webhook may state: the de-duplication window, less the
    /// tolerance for the difference between Kora's clock and this one.
    private func legacyHorizon(_ now: UnixTime) -> UnixTime {
        UnixTime(milliseconds: dedupSince(now).milliseconds + Int64(configuration.toleranceSeconds) * 1000)
    }

    /// Says that a webhook refused as stale was signed with the secret: Kora's own, so its event is
    /// lost unless an operator gets it from Kora. Said quietly when the sidecar already accepted that
    /// event (Kora sending it again late, or a captured webhook replayed), so that nobody can raise
    /// the alert at will with a webhook they hold.
    private func reportLate(_ body: [UInt8], _ headers: HTTPFields, timestamp: String?, at now: UnixTime, _ log: Logger.Metadata) async {
        var late = log
        late["webhook.timestamp"] = "\(timestamp ?? "-")"
        let event = try? EventNormalizer.normalize(body: body, webhookID: headers[Header.webhookID], receivedAt: now)
        late["webhook.id"] = "\(event?.id ?? "-")"
        let accepted = (try? await store.hasSeen(any: event?.dedupKeys ?? [], since: dedupSince(now))) ?? false
        guard !accepted else {
            logger.info("A webhook signed with the webhook secret arrived outside webhooks.toleranceSeconds; its event was accepted before", metadata: late)
            return
        }
        metrics.webhookSignedLate()
        logger.error(
            "A webhook signed with the webhook secret arrived outside webhooks.toleranceSeconds: its event is not accepted; check the clock, and find the event by its id",
            metadata: late)
    }

    /// Since when an event id counts as seen (`webhooks.dedupWindowHours`).
    private func dedupSince(_ now: UnixTime) -> UnixTime {
        UnixTime(milliseconds: now.milliseconds - Int64(configuration.dedupWindowHours) * 3_600_000)
    }

    /// The event in the normalised schema.
    /// - Throws: 400 `INVALID_PAYLOAD` once a signed payload that cannot be parsed is quarantined.
    private func normalize(
        _ body: [UInt8], _ headers: HTTPFields, verified: Bool, at now: UnixTime, _ log: inout Logger.Metadata
    ) async throws(SidecarHTTPError) -> KoraEvent {
        let originalHeaders = Header.original.compactMap { name in headers[name].map { (name.rawName, $0) } }
        do {
            let event = try EventNormalizer.normalize(
                body: body, webhookID: headers[Header.webhookID], receivedAt: now, signatureVerified: verified,
                originalHeaders: originalHeaders)
            log["webhook.id"] = "\(event.id)"
            log["webhook.type"] = "\(event.type)"
            return event
        } catch {
            try await quarantine(body, headers: originalHeaders, reason: error.reason, verified: verified, at: now, log)
            throw SidecarHTTPError(.badRequest, code: "INVALID_PAYLOAD", message: "The payload is not a JSON object with an event type: \(error.reason).")
        }
    }

    /// The 200 Kora gets, with its log line and metric.
    private func answer(_ result: HandoffResult, unverified: SignatureFailure?, _ log: Logger.Metadata) -> Response {
        var log = log
        let counted: String
        switch result {
        case .duplicate:
            log["webhook.result"] = "duplicate"
            logger.info("Webhook already seen", metadata: log)
            counted = "duplicate"
        case .unrouted:
            log["webhook.result"] = "unrouted"
            logger.warning("Webhook matched no service; kept as unrouted", metadata: log)
            counted = "unrouted"
        case .taken(let recipients):
            log["webhook.result"] = "accepted"
            log["webhook.recipients"] = "\(recipients)"
            logger.info("Webhook accepted", metadata: log)
            counted = "accepted"
        }
        // Report-only rollouts count what failed verification apart, whatever became of it: a copy
        // of an event already accepted too, else one of Kora's two copies could fail unseen.
        if let unverified {
            metrics.webhookUnverified(reason: unverified.rawValue)
        } else {
            metrics.webhook(counted)
        }
        return JSONResponse.make(.ok, result == .duplicate ? Self.duplicateBody : Self.acceptedBody)
    }

    /// The two 200 bodies, encoded once.
    private static let acceptedBody = JSONWriter.encode(["received": true])
    private static let duplicateBody = JSONWriter.encode(["received": true, "duplicate": true])

    private func quarantine(
        _ body: [UInt8], headers: [(name: String, value: String)], reason: String, verified: Bool, at now: UnixTime,
        _ metadata: Logger.Metadata
    ) async throws(SidecarHTTPError) {
        var metadata = metadata
        metadata["webhook.result"] = "INVALID_PAYLOAD"
        // Unsigned junk in report-only mode is refused but not kept: anyone could fill the store.
        guard verified else {
            logger.warning("Unsigned payload refused", metadata: metadata)
            return
        }
        do {
            let payload = QuarantinedPayload(
                receivedAt: now, reason: reason, body: body,
                headers: Dictionary(headers.map { ($0.name, $0.value) }, uniquingKeysWith: { $1 }), signatureVerified: verified)
            try await store.quarantine(payload)
        } catch {
            logger.error("Payload could not be quarantined", metadata: metadata.merging(["error": "\(error)"]) { $1 })
            throw .unavailable("The sidecar could not store the payload; retry later.", reason: .store)
        }
        logger.warning("Signed payload quarantined", metadata: metadata)
    }
}

extension SignatureFailure {
    /// The sentence returned with the 401.
    var message: String {
        switch self {
        case .missingSignature: "The request carries no X-Signature or X-Kora-Signature header."
        case .invalidSignature: "The signature does not match the body."
        case .staleTimestamp: "X-Timestamp is missing, malformed or outside the tolerance window."
        case .unsupportedAlgorithm: "X-Signature-Algorithm must be sha256."
        }
    }
}
