import HTTPTypes
import Hummingbird
import KoraSidecarCore
import Logging
import NIOConcurrencyHelpers
import NIOCore

/// How an accepted webhook reaches the services (SPEC §4.5).
enum IngressDelivery: Sendable {
    /// Deliver synchronously; 200 only when every service answered 2xx.
    case direct(EventSender, DeliveredEvents)
    /// Commit to the outbox, then wake the dispatcher.
    case queued(OutboxDispatcher)
}

/// The webhook route (SPEC §4): read the raw body within limits, verify it before parsing,
/// quarantine what cannot be parsed, de-duplicate, then deliver or store.
struct WebhookIngress: Sendable {
    private let configuration: WebhookConfiguration
    private let verifier: SignatureVerifier
    private let store: any SidecarStore
    private let router: EventRouter
    private let delivery: IngressDelivery
    private let clock: @Sendable () -> UnixTime
    private let metrics: SidecarMetrics
    private let inFlight = InFlightEvents()
    private let logger: Logger

    init(
        configuration: WebhookConfiguration, store: any SidecarStore, router: EventRouter, delivery: IngressDelivery,
        clock: @escaping @Sendable () -> UnixTime = UnixTime.now, metrics: SidecarMetrics = SidecarMetrics(), logger: Logger
    ) {
        self.metrics = metrics
        self.configuration = configuration
        self.verifier = SignatureVerifier(
            secrets: configuration.secrets, schemes: configuration.schemes, toleranceSeconds: configuration.toleranceSeconds)
        self.store = store
        self.router = router
        self.delivery = delivery
        self.clock = clock
        self.logger = logger
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
            metrics.webhook(error.code)
            return error.response(channel: context.channel)
        }
    }

    private func accept(_ request: Request, context: SidecarRequestContext) async throws(SidecarHTTPError) -> Response {
        let limits = configuration.limits
        let buffer = try await BodyReader.collect(request, channel: context.channel, limit: limits.maxBodyBytes, logger: logger)
        let body = Array(buffer.readableBytesView)
        let now = clock()
        let headers = SignatureHeaders(
            signature: request.headers[Header.signature], timestamp: request.headers[Header.timestamp],
            algorithm: request.headers[Header.algorithm], legacySignature: request.headers[Header.legacySignature])
        var metadata: Logger.Metadata = ["webhook.bytes": "\(body.count)"]

        var unverified: SignatureFailure?
        switch verifier.verify(body: body, headers: headers, now: now.seconds) {
        case .success(let scheme):
            metadata["webhook.scheme"] = "\(scheme.rawValue)"
        case .failure(let failure):
            metadata["webhook.result"] = "\(failure.rawValue)"
            guard !configuration.enforce else {
                logger.warning("Webhook rejected", metadata: metadata)
                throw SidecarHTTPError(.unauthorized, code: failure.rawValue, message: failure.message)
            }
            logger.warning("Webhook signature not verified; delivering anyway (report-only mode)", metadata: metadata)
            unverified = failure
        }
        let verified = unverified == nil

        let originalHeaders = Header.original.compactMap { name in request.headers[name].map { (name.rawName, $0) } }
        let event: KoraEvent
        do {
            event = try EventNormalizer.normalize(
                body: body, webhookID: request.headers[Header.webhookID], receivedAt: now, signatureVerified: verified,
                originalHeaders: originalHeaders)
        } catch {
            try await quarantine(body, headers: originalHeaders, reason: error.reason, verified: verified, at: now, metadata)
            throw SidecarHTTPError(.badRequest, code: "INVALID_PAYLOAD", message: "The payload is not a JSON object with an event type: \(error.reason).")
        }
        metadata["webhook.id"] = "\(event.id)"
        metadata["webhook.type"] = "\(event.type)"

        let recipients: [DeliveryService]
        do {
            recipients = try await router.recipients(of: event)
        } catch {
            throw storeUnavailable(error, metadata)
        }
        let dedupSince = UnixTime(milliseconds: now.milliseconds - Int64(configuration.dedupWindowHours) * 3_600_000)
        var result = "accepted"
        switch delivery {
        case _ where recipients.isEmpty:
            // In either mode an event no service takes is kept, so that an operator can route it later.
            guard try await store(event, for: [], at: now, dedupSince: dedupSince, metadata) == .accepted else { return duplicate(metadata) }
            result = "unrouted"
        case .queued(let dispatcher):
            guard try await store(event, for: recipients, at: now, dedupSince: dedupSince, metadata) == .accepted else {
                return duplicate(metadata)
            }
            dispatcher.notify(services: recipients.map(\.name))
        case .direct(let sender, let delivered):
            // Kora's two copies of an event (dashboard and callback URL) arrive together: the second
            // waits for Kora's retry rather than being delivered twice.
            guard inFlight.begin(event.id) else {
                throw .unavailable("The same event is being delivered now; retry later.")
            }
            defer { inFlight.end(event.id) }
            do {
                if try await delivered.contains(any: event.dedupKeys, since: dedupSince) { return duplicate(metadata) }
            } catch {
                throw storeUnavailable(error, metadata)
            }
            guard await deliverDirectly(event, to: recipients, sender: sender, metadata) else {
                throw .unavailable("A service did not accept the event; retry later.")
            }
            delivered.record(event.dedupKeys, at: now)
        }
        metadata["webhook.result"] = "\(result)"
        metadata["webhook.recipients"] = "\(recipients.count)"
        if result == "unrouted" {
            logger.warning("Webhook matched no service; kept as unrouted", metadata: metadata)
        } else {
            logger.info("Webhook accepted", metadata: metadata)
        }
        if let unverified {
            metrics.webhookUnverified(reason: unverified.rawValue)
        } else {
            metrics.webhook(result)
        }
        return JSONResponse.make(.ok, Self.acceptedBody)
    }

    /// Commits `event` with a pending delivery for each of `recipients` (none: kept as unrouted).
    private func store(
        _ event: KoraEvent, for recipients: [DeliveryService], at now: UnixTime, dedupSince: UnixTime, _ metadata: Logger.Metadata
    ) async throws(SidecarHTTPError) -> EnqueueResult {
        do {
            return try await store.enqueue(event, services: recipients.map(\.name), at: now, dedupSince: dedupSince)
        } catch {
            logger.error("Webhook not stored", metadata: metadata.merging(["error": "\(error)"]) { $1 })
            throw .unavailable("The sidecar could not store the event; retry later.")
        }
    }

    /// The two 200 bodies, encoded once.
    private static let acceptedBody = JSONWriter.encode(["received": true])
    private static let duplicateBody = JSONWriter.encode(["received": true, "duplicate": true])

    /// Logs a failed store read and gives the 503 that makes Kora retry.
    private func storeUnavailable(_ error: any Error, _ metadata: Logger.Metadata) -> SidecarHTTPError {
        logger.error("Store unavailable", metadata: metadata.merging(["error": "\(error)"]) { $1 })
        return .unavailable("The sidecar cannot reach its store; retry later.")
    }

    private func duplicate(_ metadata: Logger.Metadata) -> Response {
        var metadata = metadata
        metadata["webhook.result"] = "duplicate"
        logger.info("Webhook already seen", metadata: metadata)
        metrics.webhook("duplicate")
        return JSONResponse.make(.ok, Self.duplicateBody)
    }

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
            throw .unavailable("The sidecar could not store the payload; retry later.")
        }
        logger.warning("Signed payload quarantined", metadata: metadata)
    }

    /// Sends to every recipient at once; true when every one took it.
    private func deliverDirectly(
        _ event: KoraEvent, to recipients: [DeliveryService], sender: EventSender, _ metadata: Logger.Metadata
    ) async -> Bool {
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
            guard !result.succeeded else { continue }
            var metadata = metadata
            metadata["service"] = "\(name)"
            metadata["delivery.status"] = "\(result.statusCode.map(String.init) ?? "-")"
            if let error = result.error { metadata["error"] = "\(error)" }
            logger.warning("Direct delivery refused", metadata: metadata)
            everyServiceTookIt = false
        }
        return everyServiceTookIt
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

/// Event ids being delivered in `direct` mode right now.
final class InFlightEvents: Sendable {
    private let ids = NIOLockedValueBox<Set<String>>([])

    /// Marks `id` in flight; false when it already was.
    func begin(_ id: String) -> Bool { ids.withLockedValue { $0.insert(id).inserted } }

    func end(_ id: String) { ids.withLockedValue { _ = $0.remove(id) } }
}
