import KoraSidecarCore
import AsyncHTTPClient
import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import NIOHTTP1

/// The seams of the API proxy that tests and the demo set; production uses the defaults.
package struct KoraProxyOptions: Sendable {
    /// How the proxy waits between retries; nil sleeps for real.
    package var sleep: (@Sendable (Duration) async throws -> Void)?
    /// The `callbackUrl` to inject instead of `kora.callbackURL` (the demo learns its webhook port
    /// only once the listener is bound).
    package var callbackURL: (@Sendable () async -> String?)?
    /// The window of the Kora budget: a minute, shorter in tests.
    package var budgetWindow = Duration.seconds(60)

    init() {}
}

/// The Kora IDV API proxy's routes on the internal listener: which service is calling and what it
/// may call, `callbackUrl` injection and the origin of each created verification. The call itself
/// goes through ``KoraClient`` (credentials, retries); the answer back through ``ProxyAnswer``.
struct KoraProxy: Sendable {
    private let kora: KoraConfiguration
    private let limits: ListenerLimits
    /// The proxied bodies held until Kora answers: uploads to a slow Kora stop at this bound with
    /// 503 instead of growing the process until it is killed, and the webhooks with it.
    private let bodies: BodyBudget
    private let identity: ServiceIdentity
    let client: KoraClient
    let store: any SidecarStore
    /// Which service created each verification (the verification exists at Kora whatever happens
    /// to its record: failing the call would make the service create another).
    let origins: VerificationOrigins
    private let callbackURL: @Sendable () async -> String?
    let logger: Logger
    let metrics: SidecarMetrics
    /// Refusals any caller of the listener can repeat at will: logged at most once a second each.
    let refusedLogs = (unknownToken: LogThrottle(every: .seconds(1)), notAllowed: LogThrottle(every: .seconds(1)))
    /// How long a create waits for the same key's create in flight elsewhere before asking Kora.
    let idempotencyWait: Duration

    /// Creates the proxy. `client` should be built with ``KoraClient/clientConfiguration(timeoutSeconds:)``.
    init(
        configuration: SidecarConfiguration, client: HTTPClient, store: any SidecarStore, origins: VerificationOrigins,
        options: KoraProxyOptions = .init(), metrics: SidecarMetrics = SidecarMetrics(), logger: Logger
    ) {
        self.kora = configuration.kora
        self.limits = configuration.internal.limits
        self.bodies = BodyBudget(bytes: BodyBudget.bytes(maxBodyBytes: configuration.internal.limits.maxBodyBytes))
        self.identity = ServiceIdentity(services: configuration.services)
        self.client = KoraClient(
            kora: configuration.kora, client: client, policy: ProxyRetryPolicy(configuration.kora.retry, sleep: options.sleep),
            budget: KoraBudget(
                perMinute: configuration.kora.rateLimit.perMinute, maxWait: configuration.kora.rateLimit.maxWait, window: options.budgetWindow,
                // Replicas sharing PostgreSQL share the budget through it; otherwise this process counts alone.
                ledger: (store as? any BudgetLedger) ?? LocalBudgetLedger(), metrics: metrics),
            shares: Dictionary(configuration.services.map { ($0.name, $0.share) }, uniquingKeysWith: { first, _ in first }),
            metrics: metrics, logger: logger)
        self.store = store
        self.origins = origins
        self.metrics = metrics
        let configured = configuration.kora.callbackURL
        self.callbackURL = options.callbackURL ?? { configured }
        self.logger = logger
        // A create in flight ends within two calls (a repeat's lookup, then its create), each of at
        // most maxAttempts attempts, each waiting for a turn of the budget, its time-out and a retry's delay.
        let attempt =
            configuration.kora.rateLimit.maxWait + .seconds(configuration.kora.timeoutSeconds)
            + .milliseconds(configuration.kora.retry.maxDelayMilliseconds)
        self.idempotencyWait = attempt * (2 * configuration.kora.retry.maxAttempts)
    }

    // MARK: Routes

    /// `ANY /api/v1/idv/{path}` and its alias `ANY /api/v1/{path}`: forwards to `{apiBaseURL}/{path}`.
    func forward(_ request: Request, context: SidecarRequestContext) async throws -> Response {
        let path = Self.koraPath(request.uri.path)
        guard Self.isPlain(path) else {
            metrics.proxyCallRefused("INVALID_PATH")
            throw SidecarHTTPError(
                .badRequest, code: "INVALID_PATH", message: "The path may not hold '#', '\\', ';', quotes, angle brackets, spaces, control or non-ASCII characters, empty, '.' or '..' segments, or encoded letters, digits, dots and slashes.")
        }
        let caller = try authorize(request, method: request.method.rawValue, path: path)
        try await checkOwnVerifications(caller, method: request.method.rawValue, path: path)
        let body: BodyReader.Held
        do {
            body = try await BodyReader.hold(request, channel: context.channel, limit: limits.maxBodyBytes, budget: bodies, logger: logger)
        } catch {
            metrics.proxyCallRefused(error.code)
            throw error
        }
        defer { body.giveBack() }
        let call = KoraCall(method: request.method, path: path, query: request.uri.query, headers: request.headers, body: body.body)
        if Self.isCreate(method: request.method, path: path) {
            let answer = try await createOnce(call, caller: caller, key: request.headers[Self.idempotencyKey])
            return JSONResponse.make(answer.status, answer.body, headers: answer.headers).withContentType(answer.contentType)
        }
        let response = try await client.send(call, service: caller.name)
        return try await ProxyAnswer.passBack(response, head: request.method == .head)
    }

    /// `POST /api/verifications` with `{"userId", "tier"}`: the seed server of Kora's integration
    /// guide; answers `{"verificationId": "..."}`, or Kora's error unchanged.
    func createShortcut(_ request: Request, context: SidecarRequestContext) async throws -> Response {
        let caller = try authorize(request, method: "POST", path: "/verifications")
        let buffer = try await BodyReader.collect(request, channel: context.channel, limit: min(limits.maxBodyBytes, 65536), logger: logger)
        // The guide's server passes any userId on, as mobile back ends' integer ids too, and falls
        // back to the standard tier for a missing or empty one.
        guard let object = try? JSONParser.parse(Array(buffer.readableBytesView)), let userID = object["userId"].flatMap(Self.userID)
        else {
            throw SidecarHTTPError(.badRequest, code: "INVALID_REQUEST", message: "The body must be a JSON object with userId, a non-empty string or an integer.")
        }
        let tier = object["tier"]?.text.flatMap { $0.isEmpty ? nil : $0 } ?? "standard"
        var headers = HTTPFields()
        headers[.contentType] = "application/json"
        let body = ByteBuffer(bytes: JSONWriter.encode(["externalId": .string(userID), "tier": .string(tier)]))
        let call = KoraCall(method: .post, path: "/verifications", query: nil, headers: headers, body: body)
        let answer = try await createOnce(call, caller: caller, key: request.headers[Self.idempotencyKey])
        guard (200..<300).contains(answer.status.code), let id = answer.verificationID else {
            return JSONResponse.make(answer.status, answer.body, headers: answer.headers).withContentType(answer.contentType)
        }
        return JSONResponse.make(.ok, ["verificationId": .string(id)])
    }

    /// A shortcut's `userId` as Kora's `externalId`: a non-empty string, or an integer's digits.
    private static func userID(_ value: JSONValue) -> String? {
        switch value {
        case .string(let text) where !text.isEmpty: text
        case .number(let text) where text.utf8.allSatisfy({ $0.isASCIIDigit || $0 == UInt8(ascii: "-") }): text
        default: nil
        }
    }

    // MARK: Creating verifications

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
            // Said, without the token: a service whose token was rotated without it is locked out.
            refusedLogs.unknownToken.log(["kora.method": "\(method)"]) {
                logger.notice("Kora API call refused: no configured service has this token", metadata: $0)
            }
            metrics.proxyCallRefused("UNAUTHORIZED")
            throw SidecarHTTPError(
                .unauthorized, code: "UNAUTHORIZED", message: "Authorization: Bearer must carry the token of a configured service.")
        }
        guard caller.may(method, path) else {
            refusedLogs.notAllowed.log(["service": "\(caller.name)", "kora.method": "\(method)"]) {
                logger.notice("Kora API call refused by the allow list", metadata: $0)
            }
            metrics.proxyCallRefused("FORBIDDEN")
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
    func create(_ call: KoraCall, caller: ServiceIdentity.Caller) async throws -> CreateAnswer {
        var call = call
        if let callback = await callbackURL() {
            let body = Array(call.body.readableBytesView)
            // Forwarded without its callbackUrl, the verification's events would never reach the sidecar.
            guard case .object(let members)? = try? JSONParser.parse(body) else {
                throw SidecarHTTPError(
                    .badRequest, code: "INVALID_REQUEST",
                    message: "The body must be a JSON object: the sidecar adds callbackUrl to it (at most 64 levels deep).")
            }
            if !members.contains(where: { $0.key == "callbackUrl" }) {
                call.body = ByteBuffer(bytes: Self.adding("callbackUrl", .string(callback), to: body, isEmpty: members.isEmpty))
            }
        }
        let response = try await client.send(call, service: caller.name)
        let buffer: ByteBuffer
        do {
            buffer = try await client.collect(response, upTo: Self.maximumCreateAnswerBytes)
        } catch {
            throw SidecarHTTPError(.badGateway, code: "KORA_UNREACHABLE", message: "Kora's answer to the create could not be read.")
        }
        let body = Array(buffer.readableBytesView)
        var answer = CreateAnswer(
            status: .init(code: Int(response.status.code), reasonPhrase: response.status.reasonPhrase),
            headers: ProxyAnswer.passedHeaders(response.headers), contentType: response.headers.first(name: "content-type"),
            body: body)
        guard (200..<300).contains(answer.status.code) else { return answer }
        answer.verificationID = Self.verificationID(in: body)
        guard let id = answer.verificationID else {
            logger.warning("Kora created a verification but its id was not found in the answer", metadata: ["service": "\(caller.name)"])
            return answer
        }
        await origins.record(id, service: caller.name)
        logger.info("Verification created through the proxy", metadata: ["service": "\(caller.name)", "verification.id": "\(id)"])
        return answer
    }

    // MARK: Paths and payloads

    /// `object` (a JSON object's bytes) with the member `key: value` added before its closing brace:
    /// the caller's own bytes are kept, as Kora would have read them (no string re-encoded).
    static func adding(_ key: String, _ value: JSONValue, to object: [UInt8], isEmpty: Bool) -> [UInt8] {
        guard let close = object.lastIndex(of: UInt8(ascii: "}")) else { return object }
        let member = (isEmpty ? [] : [UInt8(ascii: ",")]) + JSONWriter.encode(.string(key)) + [UInt8(ascii: ":")] + JSONWriter.encode(value)
        return Array(object[..<close]) + member + Array(object[close...])
    }

    /// The path relative to the Kora base: `/api/v1/idv/x` and `/api/v1/x` both give `/x`.
    static func koraPath(_ path: String) -> String {
        for prefix in ["/api/v1/idv", "/api/v1"] where path == prefix || path.hasPrefix(prefix + "/") {
            let rest = String(path.dropFirst(prefix.count))
            return rest.isEmpty ? "/" : rest
        }
        return path
    }

    /// Whether `path` names one resource plainly, so that what `allow` matched is what Kora resolves:
    /// no character that ends a path or that URL parsers read differently (`#` would end it where
    /// Kora's URL is parsed, after `allow` matched all of it; `\` is a slash to some), no `.` or `..`
    /// segment, no empty segment and no percent-encoded dot, slash or backslash. A raw `;` starts
    /// path parameters, which some servers drop before resolving (`..;` is `..` to them): Kora's
    /// paths have none, and a value holding one is sent encoded. What clients send raw though
    /// RFC 3986 would encode it (`|`, `[`, `]`, `^`, `{`, `}`) passes.
    static func isPlain(_ path: String) -> Bool {
        let segments = path.split(separator: "/", omittingEmptySubsequences: false).dropFirst()
        return !path.utf8.contains(where: isUnsafeInPath) && !segments.dropLast().contains(where: \.isEmpty)
            && !segments.contains(where: { $0 == "." || $0 == ".." }) && !hasNeedlessEscape(path)
    }

    /// Whether `path` escapes a character that needs none (`%76` for `v`) or a separator (`%2f`,
    /// `%5c`): servers that decode before routing read another path than the allow list and
    /// onlyOwnVerifications checked.
    private static func hasNeedlessEscape(_ path: String) -> Bool {
        let bytes = Array(path.utf8)
        for index in bytes.indices where bytes[index] == UInt8(ascii: "%") && index + 2 < bytes.count {
            guard let high = Hex.value(of: bytes[index + 1]), let low = Hex.value(of: bytes[index + 2]) else { continue }
            let byte = high << 4 | low
            if byte.isASCIILetter || byte.isASCIIDigit || "-._~/\\".utf8.contains(byte) { return true }
        }
        return false
    }

    /// Controls, the space, DEL, non-ASCII bytes, and `#`, `\`, `"`, `<`, `>`, `` ` `` and `;`.
    private static func isUnsafeInPath(_ byte: UInt8) -> Bool {
        byte <= 0x20 || byte >= 0x7F || "#\\\"<>`;".utf8.contains(byte)
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
