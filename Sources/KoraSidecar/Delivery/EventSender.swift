import KoraSidecarCore

/// What one attempt to deliver produced.
package struct AttemptResult: Sendable, Equatable {
    /// The service's HTTP status, when it answered.
    package var statusCode: Int?
    /// Why the attempt failed without an answer, when it did.
    package var error: String?
    /// How long the attempt took.
    var durationMilliseconds: Int
    /// How long the service asked to wait (`Retry-After` on a 429 or 503).
    var retryAfter: Duration? = nil
    /// Whether the sidecar itself could not make the attempt (out of file descriptors): it then
    /// says nothing of the service.
    var ownFailure = false

    /// Whether the service took the event (2xx).
    var succeeded: Bool { statusCode.map { (200..<300).contains($0) } ?? false }

    /// Whether the attempt says the service is unwell (no answer, 5xx, 408, 429), for its circuit
    /// breaker; any other answer, even a refusal of this one event, shows it up.
    var serviceFailed: Bool {
        guard let statusCode else { return true }
        return statusCode >= 500 || statusCode == 408 || statusCode == 429
    }
}

/// Sends one event to one service over delivery's client: its body and Standard Webhooks headers,
/// within the service's time-out.
package struct EventSender: Sendable {
    private let client: DeliveryClient
    private let reportOnly: Bool

    package init(client: DeliveryClient, reportOnly: Bool) {
        self.client = client
        self.reportOnly = reportOnly
    }

    /// The body `service` receives: in its format, without what it must not see (`redact`); nil
    /// when the normalised body cannot be read back (it always can: it is the sidecar's own JSON).
    static func body(of event: KoraEvent, for service: DeliveryService) -> [UInt8]? {
        let body = event.body(for: service.format)
        guard !service.redact.isEmpty else { return body }
        return (try? JSONParser.parse(body)).map { JSONWriter.encode($0.removing(service.redact)) }
    }

    /// Delivers `event` to `service` as attempt number `attempt`.
    package func send(_ event: KoraEvent, to service: DeliveryService, attempt: Int) async -> AttemptResult {
        let started = ContinuousClock.now
        guard let body = Self.body(of: event, for: service) else {
            // Fail closed: what a service must not receive is never sent unredacted.
            return AttemptResult(statusCode: nil, error: "the body could not be redacted", durationMilliseconds: 0)
        }
        guard let endpoint = service.endpoint else {
            return AttemptResult(statusCode: nil, error: "the service's URL is not usable", durationMilliseconds: 0)
        }
        let headers = DeliveryHeaders.make(
            event: event, body: body, service: service, attempt: attempt, timestamp: UnixTime.now().seconds, reportOnly: reportOnly)
        func elapsed() -> Int { Int((ContinuousClock.now - started).milliseconds) }
        do {
            let answer = try await client.post(headers, body: body, to: endpoint, timeout: service.timeout)
            let retryAfter = answer.status == 429 || answer.status == 503 ? answer.retryAfter.flatMap { RetryAfter.parse($0, now: .now()) } : nil
            return AttemptResult(statusCode: answer.status, error: nil, durationMilliseconds: elapsed(), retryAfter: retryAfter)
        } catch {
            return AttemptResult(
                statusCode: nil, error: HTTPClientFailure.describe(error), durationMilliseconds: elapsed(), ownFailure: HTTPClientFailure.isOwnLimit(error))
        }
    }
}
