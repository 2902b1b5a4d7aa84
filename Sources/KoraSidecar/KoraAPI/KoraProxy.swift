import KoraSidecarCore
import AsyncHTTPClient
import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The seams of the API proxy that tests and the demo set; production uses the defaults.
package struct KoraProxyOptions: Sendable {
    /// How the proxy waits between retries; nil sleeps for real.
    package var sleep: (@Sendable (Duration) async throws -> Void)?
    /// The `callbackUrl` to inject instead of `kora.callbackURL` (the demo learns its webhook port
    /// only once the listener is bound).
    package var callbackURL: (@Sendable () async -> String?)?

    init() {}
}

/// The Kora IDV API proxy of the internal listener (SPEC §5.1): forwards a service's call to
/// `{kora.apiBaseURL}/{path}` with the sidecar's credentials, retries what may safely be retried,
/// remembers which service created each verification, and maps transport failures to its own codes.
struct KoraProxy: Sendable {
    private let kora: KoraConfiguration
    /// `kora.apiBaseURL` without a trailing slash.
    private let baseURL: String
    private let limits: ListenerLimits
    private let identity: ServiceIdentity
    private let client: HTTPClient
    private let store: any SidecarStore
    private let policy: ProxyRetryPolicy
    private let callbackURL: @Sendable () async -> String?
    private let metrics: SidecarMetrics
    private let logger: Logger

    /// Creates the proxy. `client` should be built with ``KoraProxy/clientConfiguration(timeoutSeconds:)``.
    init(
        configuration: SidecarConfiguration, client: HTTPClient, store: any SidecarStore, options: KoraProxyOptions = .init(),
        metrics: SidecarMetrics = SidecarMetrics(), logger: Logger
    ) {
        self.metrics = metrics
        self.kora = configuration.kora
        var base = Substring(configuration.kora.apiBaseURL)
        while base.hasSuffix("/") { base = base.dropLast() }
        self.baseURL = String(base)
        self.limits = configuration.internal.limits
        self.identity = ServiceIdentity(services: configuration.services)
        self.client = client
        self.store = store
        self.policy = ProxyRetryPolicy(configuration.kora.retry, sleep: options.sleep)
        let configured = configuration.kora.callbackURL
        self.callbackURL = options.callbackURL ?? { configured }
        self.logger = logger
    }

    /// The proxy's own HTTP client: no redirects, connect and read time-outs of `kora.timeoutSeconds`,
    /// no hidden connection retries (the proxy's retry rules decide, SPEC §5.1) and no tracing.
    package static func clientConfiguration(timeoutSeconds: Int) -> HTTPClient.Configuration {
        let timeout = TimeAmount.seconds(Int64(max(1, timeoutSeconds)))
        var configuration = HTTPClient.Configuration(
            redirectConfiguration: .disallow,
            timeout: .init(connect: timeout, read: timeout),
            connectionPool: .init(idleTimeout: .seconds(60), concurrentHTTP1ConnectionsPerHostSoftLimit: 64))
        configuration.connectionPool.retryConnectionEstablishment = false
        configuration.decompression = .disabled
        configuration.tracing.tracer = nil
        return configuration
    }

    // MARK: Routes

    /// `ANY /api/v1/idv/{path}` and its alias `ANY /api/v1/{path}`: forwards to `{apiBaseURL}/{path}`.
    func forward(_ request: Request, context: SidecarRequestContext) async throws -> Response {
        let path = Self.koraPath(request.uri.path)
        guard Self.isPlain(path) else {
            throw SidecarHTTPError(
                .badRequest, code: "INVALID_PATH", message: "The path may not hold empty, '.' or '..' segments or encoded dots and slashes.")
        }
        let caller = try authorize(request, method: request.method.rawValue, path: path)
        let body = try await BodyReader.collect(request, channel: context.channel, limit: limits.maxBodyBytes, logger: logger)
        let call = KoraCall(method: request.method, path: path, query: request.uri.query, headers: request.headers, body: body)
        if Self.isCreate(method: request.method, path: path) {
            let answer = try await create(call, caller: caller)
            return JSONResponse.make(answer.status, answer.body, headers: answer.headers).withContentType(answer.contentType)
        }
        let response = try await send(call, caller: caller)
        return try await Self.passBack(response, head: request.method == .head)
    }

    /// `POST /api/verifications` with `{"userId", "tier"}`: the seed server of Kora's integration
    /// guide; answers `{"verificationId": "..."}`, or Kora's error unchanged.
    func createShortcut(_ request: Request, context: SidecarRequestContext) async throws -> Response {
        let caller = try authorize(request, method: "POST", path: "/verifications")
        let buffer = try await BodyReader.collect(request, channel: context.channel, limit: min(limits.maxBodyBytes, 65536), logger: logger)
        guard let object = try? JSONParser.parse(Array(buffer.readableBytesView)), case .string(let userID)? = object["userId"], !userID.isEmpty
        else {
            throw SidecarHTTPError(.badRequest, code: "INVALID_REQUEST", message: "The body must be a JSON object with a non-empty string userId.")
        }
        let tier = object["tier"]?.text ?? "standard"
        var headers = HTTPFields()
        headers[.contentType] = "application/json"
        let body = ByteBuffer(bytes: JSONWriter.encode(["externalId": .string(userID), "tier": .string(tier)]))
        let call = KoraCall(method: .post, path: "/verifications", query: nil, headers: headers, body: body)
        let answer = try await create(call, caller: caller)
        guard (200..<300).contains(answer.status.code), let id = answer.verificationID else {
            return JSONResponse.make(answer.status, answer.body, headers: answer.headers).withContentType(answer.contentType)
        }
        return JSONResponse.make(.ok, ["verificationId": .string(id)])
    }

    // MARK: Forwarding

    /// One call to Kora as a service made it.
    struct KoraCall {
        var method: HTTPRequest.Method
        /// Relative to the Kora base, starting with `/`.
        var path: String
        var query: String?
        var headers: HTTPFields
        var body: ByteBuffer
    }

    /// What a create answered, read whole (it is small) so the verification id can be recorded.
    struct CreateAnswer {
        var status: HTTPResponse.Status
        var headers: HTTPFields
        var contentType: String?
        var body: [UInt8]
        var verificationID: String?
    }

    /// Largest create answer read (a verification object is a few hundred bytes).
    static let maximumCreateAnswerBytes = 1 << 20

    private func authorize(_ request: Request, method: String, path: String) throws -> ServiceIdentity.Caller {
        guard let caller = identity.caller(authorization: request.headers[.authorization]) else {
            throw SidecarHTTPError(
                .unauthorized, code: "UNAUTHORIZED", message: "Authorization: Bearer must carry the token of a configured service.")
        }
        guard caller.may(method, path) else {
            logger.notice("Kora API call refused by the allow list", metadata: ["service": "\(caller.name)", "kora.method": "\(method)"])
            throw SidecarHTTPError(.forbidden, code: "FORBIDDEN", message: "Service \(caller.name) may not call \(method) \(path).")
        }
        guard kora.apiKey != nil, kora.tenantId != nil else {
            throw SidecarHTTPError(
                .serviceUnavailable, code: "PROXY_NOT_CONFIGURED",
                message: "The Kora API proxy needs kora.apiKey and kora.tenantId in the sidecar's configuration.")
        }
        return caller
    }

    /// Sends a create, adding `callbackUrl`, and records the creating service as the origin of the
    /// returned verification id.
    private func create(_ call: KoraCall, caller: ServiceIdentity.Caller) async throws -> CreateAnswer {
        var call = call
        if let callback = await callbackURL(), case .object(var members)? = try? JSONParser.parse(Array(call.body.readableBytesView)),
            !members.contains(where: { $0.key == "callbackUrl" || $0.key == "callback_url" })
        {
            members.append(JSONMember("callbackUrl", .string(callback)))
            call.body = ByteBuffer(bytes: JSONWriter.encode(.object(members)))
        }
        let response = try await send(call, caller: caller)
        let buffer: ByteBuffer
        do {
            buffer = try await response.body.collect(upTo: Self.maximumCreateAnswerBytes)
        } catch {
            throw SidecarHTTPError(.badGateway, code: "KORA_UNREACHABLE", message: "Kora's answer to the create could not be read.")
        }
        let body = Array(buffer.readableBytesView)
        var answer = CreateAnswer(
            status: .init(code: Int(response.status.code), reasonPhrase: response.status.reasonPhrase),
            headers: Self.passedHeaders(response.headers), contentType: response.headers.first(name: "content-type"),
            body: body)
        guard (200..<300).contains(answer.status.code) else { return answer }
        answer.verificationID = Self.verificationID(in: body)
        guard let id = answer.verificationID else {
            logger.warning("Kora created a verification but its id was not found in the answer", metadata: ["service": "\(caller.name)"])
            return answer
        }
        do {
            try await store.recordOrigin(verificationID: id, service: caller.name, at: .now())
        } catch {
            // The verification exists at Kora: failing the call would make the service create another.
            logger.error(
                "The origin of a verification could not be stored; onlyOwnVerifications may not route its events",
                metadata: ["service": "\(caller.name)", "verification.id": "\(id)", "error": "\(error)"])
        }
        logger.info("Verification created through the proxy", metadata: ["service": "\(caller.name)", "verification.id": "\(id)"])
        return answer
    }

    /// Sends `call` to Kora with the sidecar's credentials, retrying as SPEC §5.1 allows; answers
    /// Kora's response (body not yet read) or throws the proxy's own error.
    private func send(_ call: KoraCall, caller: ServiceIdentity.Caller) async throws -> HTTPClientResponse {
        let request = upstreamRequest(call)
        let isRead = call.method == .get || call.method == .head
        let timeout = TimeAmount.seconds(Int64(max(1, kora.timeoutSeconds)))
        var attempt = 0
        var status: Int?
        var errorText: String?
        // Built only for a line that is logged: a successful call logs at debug.
        func metadata() -> Logger.Metadata {
            var metadata: Logger.Metadata = [
                "service": "\(caller.name)", "kora.method": "\(call.method.rawValue)", "kora.path": "\(call.path)", "kora.attempt": "\(attempt)",
            ]
            if let status { metadata["kora.status"] = "\(status)" }
            if let errorText { metadata["error"] = "\(errorText)" }
            return metadata
        }
        while true {
            attempt += 1
            let response: HTTPClientResponse
            let started = ContinuousClock.now
            do {
                response = try await client.execute(request, timeout: timeout)
                metrics.koraCall(
                    statusClass: "\(response.status.code / 100)xx", milliseconds: Int((ContinuousClock.now - started).milliseconds))
            } catch {
                metrics.koraCall(statusClass: "error", milliseconds: Int((ContinuousClock.now - started).milliseconds))
                try Task.checkCancellation()
                let failure = TransportFailure(error)
                errorText = EventSender.describe(error)
                if attempt < policy.maxAttempts, failure == .notSent || (isRead && failure == .lost) {
                    logger.debug("Kora call failed; retrying", metadata: metadata())
                    try await policy.sleep(policy.backoff(after: attempt))
                    continue
                }
                logger.warning("Kora could not be reached", metadata: metadata())
                throw failure.error
            }
            let code = Int(response.status.code)
            status = code
            if attempt < policy.maxAttempts, code == 429 || (isRead && code >= 500),
                let delay = policy.delay(after: attempt, retryAfter: response.headers.first(name: "retry-after"))
            {
                logger.debug("Kora asked to retry", metadata: metadata())
                _ = try? await response.body.collect(upTo: 1 << 20)
                try await policy.sleep(delay)
                continue
            }
            if code == 401 || code == 403 {
                _ = try? await response.body.collect(upTo: 1 << 20)
                logger.error("Kora rejected the sidecar's own API key: check kora.apiKey and kora.tenantId", metadata: metadata())
                metrics.koraCredentialsRejected()
                throw SidecarHTTPError(
                    .badGateway, code: "KORA_CREDENTIALS_REJECTED",
                    message: "Kora rejected the sidecar's credentials; an operator must check kora.apiKey and kora.tenantId.")
            }
            logger.debug("Kora call answered", metadata: metadata())
            return response
        }
    }

    /// Request header names never forwarded: the caller's credentials and hop-by-hop headers
    /// (RFC 9110 §7.6.1), plus what the client sets itself. `Accept-Encoding` is dropped so that
    /// Kora answers uncompressed bytes the proxy can pass on unchanged.
    static let droppedRequestHeaders: Set<String> = [
        "authorization", "x-tenant-id", "cookie", "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
        "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length", "expect", "accept-encoding",
    ]

    private func upstreamRequest(_ call: KoraCall) -> HTTPClientRequest {
        var url = baseURL + call.path
        if let query = call.query, !query.isEmpty { url += "?" + query }
        var request = HTTPClientRequest(url: url)
        request.method = HTTPMethod(rawValue: call.method.rawValue)
        let connection = call.headers[values: .connection]
        let listed = connection.isEmpty ? [] : Set(connection.flatMap { $0.split(separator: ",") }.map { $0.trimmingSpaces.lowercased() })
        for field in call.headers {
            let name = field.name.canonicalName
            if Self.droppedRequestHeaders.contains(name) || listed.contains(name) { continue }
            request.headers.add(name: field.name.rawName, value: field.value)
        }
        request.headers.add(name: "Authorization", value: "Bearer " + (kora.apiKey?.value ?? ""))
        request.headers.add(name: "X-Tenant-ID", value: kora.tenantId?.value ?? "")
        if call.body.readableBytes > 0 || ![HTTPRequest.Method.get, .head, .delete, .options].contains(call.method) {
            request.body = .bytes(call.body)
        }
        return request
    }

    /// Kora's response headers passed back to the service.
    static func passedHeaders(_ headers: HTTPHeaders) -> HTTPFields {
        var fields = HTTPFields()
        for (name, value) in headers {
            let lower = name.lowercased()
            let passed =
                lower.hasPrefix("x-ratelimit-")
                || ["retry-after", "content-disposition", "location", "cache-control", "etag", "last-modified", "x-request-id"].contains(lower)
                || lower == "content-type"
            if passed, let fieldName = HTTPField.Name(name) { fields.append(HTTPField(name: fieldName, value: value)) }
        }
        return fields
    }

    /// Largest answer of known length passed back as one buffer; longer ones are streamed.
    static let bufferedAnswerBytes = 64 * 1024

    /// Kora's response as the service's response: read whole when it is small (one write, no
    /// streaming machinery), else its body streamed through as it arrives.
    static func passBack(_ response: HTTPClientResponse, head: Bool) async throws(SidecarHTTPError) -> Response {
        let status = HTTPResponse.Status(code: Int(response.status.code), reasonPhrase: response.status.reasonPhrase)
        let headers = passedHeaders(response.headers)
        if head { return Response(status: status, headers: headers, body: .init()) }
        let length = response.headers.first(name: "content-length").flatMap { Int($0) }
        if let length, length <= bufferedAnswerBytes {
            do {
                return Response(status: status, headers: headers, body: .init(byteBuffer: try await response.body.collect(upTo: length)))
            } catch {
                throw SidecarHTTPError(.badGateway, code: "KORA_UNREACHABLE", message: "Kora's answer could not be read.")
            }
        }
        let body = response.body
        return Response(
            status: status, headers: headers,
            body: ResponseBody(contentLength: length) { writer in
                for try await chunk in body { try await writer.write(chunk) }
                try await writer.finish(nil)
            })
    }

    // MARK: Paths and payloads

    /// The path relative to the Kora base: `/api/v1/idv/x` and `/api/v1/x` both give `/x`.
    static func koraPath(_ path: String) -> String {
        for prefix in ["/api/v1/idv", "/api/v1"] where path == prefix || path.hasPrefix(prefix + "/") {
            let rest = String(path.dropFirst(prefix.count))
            return rest.isEmpty ? "/" : rest
        }
        return path
    }

    /// Whether `path` names one resource plainly: no `.` or `..` segment, no empty segment and no
    /// percent-encoded dot, slash or backslash, so that what `allow` matched is what Kora resolves.
    static func isPlain(_ path: String) -> Bool {
        let segments = path.split(separator: "/", omittingEmptySubsequences: false).dropFirst()
        let lowered = path.lowercased()
        return !segments.dropLast().contains(where: \.isEmpty) && !segments.contains(where: { $0 == "." || $0 == ".." })
            && !["%2e", "%2f", "%5c"].contains(where: lowered.contains)
    }

    /// Whether the call creates a verification (`POST /verifications`).
    static func isCreate(method: HTTPRequest.Method, path: String) -> Bool {
        method == .post && (path == "/verifications" || path == "/verifications/")
    }

    /// The verification id in a create answer: `id`, else `verificationId`, also inside `data`.
    static func verificationID(in body: [UInt8]) -> String? {
        guard let value = try? JSONParser.parse(body) else { return nil }
        for object in [value, value["data"] ?? .null, value["verification"] ?? .null] {
            for key in ["id", "verificationId", "verification_id"] {
                if let id = object[key]?.text, !id.isEmpty { return id }
            }
        }
        return nil
    }
}

/// How a call to Kora failed without an answer.
enum TransportFailure: Equatable {
    /// The connection was never established: nothing reached Kora, any method may be retried.
    case notSent
    /// Kora did not answer within `kora.timeoutSeconds`.
    case timedOut
    /// The connection broke after the request may have been sent.
    case lost

    init(_ error: any Error) {
        switch error {
        case let error as HTTPClientError where error == .connectTimeout || error == .getConnectionFromPoolTimeout:
            self = .notSent
        case let error as HTTPClientError where error == .deadlineExceeded || error == .readTimeout:
            self = .timedOut
        case is NIOConnectionError:
            self = .notSent
        case let error as ChannelError:
            if case .connectTimeout = error { self = .notSent } else { self = .lost }
        case let error as IOError where [ECONNREFUSED, ENOENT, ENETUNREACH, EHOSTUNREACH, EADDRNOTAVAIL].contains(error.errnoCode):
            self = .notSent
        default:
            self = .lost
        }
    }

    /// The proxy's answer when this ends the call.
    var error: SidecarHTTPError {
        switch self {
        case .timedOut:
            SidecarHTTPError(.gatewayTimeout, code: "KORA_TIMEOUT", message: "Kora did not answer in time.")
        case .notSent, .lost:
            SidecarHTTPError(.badGateway, code: "KORA_UNREACHABLE", message: "Kora could not be reached.")
        }
    }
}

extension Response {
    /// This response with `Content-Type` set to `value` (Kora's own), when there is one.
    fileprivate func withContentType(_ value: String?) -> Response {
        guard let value else { return self }
        var response = self
        response.headers[.contentType] = value
        return response
    }
}
