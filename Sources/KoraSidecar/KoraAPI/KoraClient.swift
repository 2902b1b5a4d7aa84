import AsyncHTTPClient
import HTTPTypes
import KoraSidecarCore
import Logging
import NIOCore
import NIOHTTP1
import ServiceLifecycle

    /// One call to Kora as a service made it.
struct KoraCall {
    var method: HTTPRequest.Method
    /// Relative to the Kora base, starting with `/`.
    var path: String
    var query: String?
    var headers: HTTPFields
    var body: ByteBuffer
}

/// Calls Kora for the proxy: adds the sidecar's credentials, drops the caller's, and retries what
/// may safely be retried (a 429, a read that failed, a call that never left), waiting `Retry-After`
/// or backing off; everything else comes back as Kora answered, or as the proxy's own error.
struct KoraClient: Sendable {
    private let kora: KoraConfiguration
    /// `kora.apiBaseURL` without a trailing slash.
    private let baseURL: String
    private let client: HTTPClient
    private let policy: ProxyRetryPolicy
    private let budget: KoraBudget
    /// Each service's `share` of the budget when calls wait.
    private let shares: [String: Int]
    private let metrics: SidecarMetrics
    private let logger: Logger
    /// Kora failing answers every call at once: one line a second says so.
    private let failedAnswers = LogThrottle(every: .seconds(1))

    init(
        kora: KoraConfiguration, client: HTTPClient, policy: ProxyRetryPolicy, budget: KoraBudget, shares: [String: Int],
        metrics: SidecarMetrics, logger: Logger
    ) {
        self.budget = budget
        self.shares = shares
        self.kora = kora
        var base = Substring(kora.apiBaseURL)
        while base.hasSuffix("/") { base = base.dropLast() }
        self.baseURL = String(base)
        self.client = client
        self.policy = policy
        self.metrics = metrics
        self.logger = logger
    }

    /// The proxy's own HTTP client: no redirects, connect and read time-outs of `kora.timeoutSeconds`,
    /// no hidden connection retries (the proxy's retry rules decide, SPEC §5.1) and no tracing.
    /// HTTP/1.1 only: NIO's HTTP/2 codec traps on a negative `:status`, which an answer of Kora's (or of
    /// a proxy in front of it) must never be able to do to the sidecar.
    package static func clientConfiguration(timeoutSeconds: Int) -> HTTPClient.Configuration {
        let timeout = TimeAmount.seconds(Int64(max(1, timeoutSeconds)))
        var configuration = HTTPClient.Configuration(
            redirectConfiguration: .disallow,
            timeout: .init(connect: timeout, read: timeout),
            connectionPool: .init(idleTimeout: .seconds(60), concurrentHTTP1ConnectionsPerHostSoftLimit: 64))
        configuration.connectionPool.retryConnectionEstablishment = false
        configuration.httpVersion = .http1Only
        configuration.decompression = .disabled
        configuration.tracing.tracer = nil
        return configuration
    }

    /// Sends `call` to Kora with the sidecar's credentials, retrying as SPEC §5.1 allows; answers
    /// Kora's response (body not yet read) or throws the proxy's own error.
    func send(_ call: KoraCall, service: String) async throws -> HTTPClientResponse {
        let request = upstreamRequest(call)
        let isRead = call.method == .get || call.method == .head
        let timeout = TimeAmount.seconds(Int64(max(1, kora.timeoutSeconds)))
        var attempt = 0
        var status: Int?
        var errorText: String?
        // Built only for a line that is logged: a successful call logs at debug.
        func metadata() -> Logger.Metadata {
            var metadata: Logger.Metadata = [
                "service": "\(service)", "kora.method": "\(call.method.rawValue)", "kora.path": "\(LoggedPath.masking(call.path))", "kora.attempt": "\(attempt)",
            ]
            if let status { metadata["kora.status"] = "\(status)" }
            if let errorText { metadata["error"] = "\(errorText)" }
            return metadata
        }
        while true {
            attempt += 1
            let response: HTTPClientResponse
            try await takeTurn(service: service)
            let started = ContinuousClock.now
            do {
                response = try await client.execute(request, timeout: timeout)
                await budget.observe(
                    limit: response.headers.first(name: "x-ratelimit-limit"),
                    remaining: response.headers.first(name: "x-ratelimit-remaining"), reset: response.headers.first(name: "x-ratelimit-reset"))
                let code = response.status.code
                metrics.koraCall(
                    statusClass: (100...599).contains(code) ? "\(code / 100)xx" : "error", milliseconds: Int((ContinuousClock.now - started).milliseconds))
            } catch {
                metrics.koraCall(statusClass: "error", milliseconds: Int((ContinuousClock.now - started).milliseconds))
                try Task.checkCancellation()
                let failure = HTTPClientFailure(error)
                errorText = HTTPClientFailure.describe(error)
                if attempt < policy.maxAttempts, failure == .notSent || (isRead && failure == .lost),
                    try await waitToRetry(policy.backoff(after: attempt))
                {
                    logger.debug("Kora call failed; retried", metadata: metadata())
                    continue
                }
                logger.warning("Kora could not be reached", metadata: metadata())
                throw failure.proxyError
            }
            let code = Int(response.status.code)
            status = code
            // HTTP/1.1 carries any three digits: a status HTTP does not define is no answer to pass on,
            // and neither is an interim one (101 would leave the service waiting on a connection that
            // no longer speaks HTTP; the client skips the others).
            guard (200...599).contains(code) else {
                logger.warning("Kora answered with a status HTTP does not define", metadata: metadata())
                throw SidecarHTTPError(.badGateway, code: "KORA_UNREACHABLE", message: "Kora answered with a status HTTP does not define.")
            }
            if attempt < policy.maxAttempts, code == 429 || (isRead && code >= 500), !Task.isShuttingDownGracefully,
                let delay = policy.delay(after: attempt, retryAfter: response.headers.first(name: "retry-after"))
            {
                logger.debug("Kora asked to retry", metadata: metadata())
                // The body is dropped unread, which closes its connection: its time-out covers only the
                // head, so a body Kora trickles would hold the call for as long as Kora liked.
                guard try await waitToRetry(delay) else {
                    throw SidecarHTTPError.stopping()
                }
                continue
            }
            if code == 401 || code == 403 {
                logger.error("Kora rejected the sidecar's own API key: check kora.apiKey and kora.tenantId", metadata: metadata())
                metrics.koraCredentialsRejected()
                throw SidecarHTTPError(
                    .badGateway, code: "KORA_CREDENTIALS_REJECTED",
                    message: "Kora rejected the sidecar's credentials; an operator must check kora.apiKey and kora.tenantId.")
            }
            if code >= 500 || code == 429 {
                // Its retries spent (or none allowed): the service gets Kora's answer.
                failedAnswers.log(metadata()) { logger.warning("Kora answered with an error; passed on to the service", metadata: $0) }
            } else {
                logger.debug("Kora call answered", metadata: metadata())
            }
            return response
        }
    }

    /// Reads the whole body of one of Kora's answers, within `kora.timeoutSeconds`: the client's
    /// time-out covers only the head, and a body Kora trickled would hold the call (and a create's
    /// `Idempotency-Key` in flight) as long as Kora liked. For answers read whole, not passed through.
    func collect(_ response: HTTPClientResponse, upTo limit: Int) async throws -> ByteBuffer {
        try await Deadline.run(
            after: .seconds(max(1, kora.timeoutSeconds)),
            error: { SidecarHTTPError(.gatewayTimeout, code: "KORA_TIMEOUT", message: "Kora's answer did not arrive in time.") }
        ) { try await response.body.collect(upTo: limit) }
    }

    /// Waits `delay` before a retry; false when the sidecar is stopping: the call then ends with
    /// what it has, so that Kora's retries (a minute and more) do not hold the stop past the
    /// orchestrator's grace period, which ends in SIGKILL.
    private func waitToRetry(_ delay: Duration) async throws -> Bool {
        guard !Task.isShuttingDownGracefully else { return false }
        try? await cancelWhenGracefulShutdown { try await self.policy.sleep(delay) }
        // A caller that went away still ends the call; a stop only ends the wait.
        try Task.checkCancellation()
        return !Task.isShuttingDownGracefully
    }

    /// Waits for `service`'s turn in the key's budget; a stop ends the wait, as it ends a retry's.
    /// - Throws: 429 `RATE_LIMITED` with `Retry-After` when no turn came within `kora.rateLimit.maxWait`,
    ///   503 when the sidecar is stopping.
    private func takeTurn(service: String) async throws {
        do {
            try await budget.acquire(service: service, share: shares[service] ?? 1)
        } catch is CancellationError where Task.isShuttingDownGracefully && !Task.isCancelled {
            throw SidecarHTTPError.stopping()
        } catch let refusal as KoraBudget.Refusal {
            let seconds = max(1, (refusal.retryAfter.milliseconds + 999) / 1000)
            logger.notice("Kora call refused: the key's budget is spent", metadata: ["service": "\(service)", "retry.after": "\(seconds)"])
            throw SidecarHTTPError(
                .tooManyRequests, code: "RATE_LIMITED", message: "The Kora API key's rate budget is spent; retry after \(seconds) s.",
                headers: [.retryAfter: String(seconds)])
        }
    }

    /// Request header names never forwarded: the caller's credentials and hop-by-hop headers
    /// (RFC 9110 §7.6.1, every `Proxy-*` among them), plus what the client sets itself. The caller's
    /// `Accept-Encoding` is replaced by `identity`, so that Kora answers bytes the proxy can read
    /// (a create's id) and pass on unchanged: without the header, a server may compress as it likes.
    private static let droppedRequestHeaders: Set<String> = [
        "authorization", "x-tenant-id", "cookie", "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "host",
        "content-length", "expect", "accept-encoding",
    ]

    private static func isDropped(_ name: String) -> Bool { droppedRequestHeaders.contains(name) || name.hasPrefix("proxy-") }

    private func upstreamRequest(_ call: KoraCall) -> HTTPClientRequest {
        var url = baseURL + call.path
        if let query = call.query, !query.isEmpty { url += "?" + query }
        var request = HTTPClientRequest(url: url)
        request.method = HTTPMethod(rawValue: call.method.rawValue)
        let connection = call.headers[values: .connection]
        let listed = connection.isEmpty ? [] : Set(connection.flatMap { $0.split(separator: ",") }.map { $0.trimmingSpaces.lowercased() })
        for field in call.headers {
            let name = field.name.canonicalName
            if Self.isDropped(name) || listed.contains(name) { continue }
            request.headers.add(name: field.name.rawName, value: field.value)
        }
        request.headers.add(name: "Accept-Encoding", value: "identity")
        request.headers.add(name: "Authorization", value: "Bearer " + (kora.apiKey?.value ?? ""))
        request.headers.add(name: "X-Tenant-ID", value: kora.tenantId?.value ?? "")
        if call.body.readableBytes > 0 || ![HTTPRequest.Method.get, .head, .delete, .options].contains(call.method) {
            request.body = .bytes(call.body)
        }
        return request
    }
}

extension HTTPClientFailure {
    /// The proxy's answer when this failure ends a call to Kora.
    var proxyError: SidecarHTTPError {
        switch self {
        case .timedOut:
            SidecarHTTPError(.gatewayTimeout, code: "KORA_TIMEOUT", message: "Kora did not answer in time.")
        case .notSent, .lost:
            SidecarHTTPError(.badGateway, code: "KORA_UNREACHABLE", message: "Kora could not be reached.")
        }
    }
}
