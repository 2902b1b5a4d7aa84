import AsyncHTTPClient
import HTTPTypes
import Hummingbird
import KoraSidecar
import KoraSidecarCore
import Logging
import NIOCore
import ServiceLifecycle

/// Builds the simulator's server for `configuration` (`kora-sidecar simulate`).
package func buildSimulator(
    configuration: SimulatorConfiguration, logger: Logger,
    onListening: @escaping @Sendable (SocketAddress?) async -> Void = { _ in }
) -> some ApplicationProtocol {
    buildSimulator(KoraSimulator(configuration: configuration), logger: logger, onListening: onListening)
}

/// Builds the server of `simulator`: the Kora API at `/api/v1/idv`, with its webhook sender and
/// delayed steps as services (stopped after the listener, then the HTTP client closes).
package func buildSimulator(
    _ simulator: KoraSimulator, logger: Logger, onListening: @escaping @Sendable (SocketAddress?) async -> Void = { _ in }
) -> some ApplicationProtocol {
    let configuration = simulator.configuration
    var clientConfiguration = HTTPClient.Configuration(redirectConfiguration: .disallow, timeout: .init(connect: .seconds(5), read: .seconds(15)))
    clientConfiguration.decompression = .disabled
    let client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: clientConfiguration)
    let worker = SimulatorWorker(simulator: simulator, client: client, logger: logger.with("component", "simulator"))
    return Application(
        router: buildSimulatorRouter(simulator),
        configuration: .init(address: .hostname(configuration.host, port: configuration.port), serverName: "kora-simulator"),
        services: [CloseOnShutdown { try? await client.shutdown() }, worker],
        onServerRunning: { channel in await onListening(channel.localAddress) },
        logger: logger.with("listener", "simulator"))
}

/// The simulator's routes (KORA.md §2), behind the rate limit and the API-key check.
func buildSimulatorRouter(_ simulator: KoraSimulator) -> Router<SidecarRequestContext> {
    let router = Router(context: SidecarRequestContext.self)
    router.add(middleware: SimulatorGate(simulator: simulator))
    router.add(middleware: ErrorShapeMiddleware())
    let api = router.group("api/v1/idv")
    api.get("health") { _, _ in JSONResponse.make(.ok, ["status": "ok", "service": "kora-idv-simulator"]) }
    api.post("verifications") { request, context in try await simulator.createRoute(request, context: context) }
    api.get("verifications/:id") { _, context in
        JSONResponse.make(.ok, try simulator.existing(context.parameters.get("id")))
    }
    api.get("subjects/:externalId/verifications") { _, context in
        let externalID = context.parameters.get("externalId") ?? ""
        let list = simulator.state.withLockedValue { state in
            state.order.compactMap { state.verifications[$0] }.filter { $0.externalID == externalID }.map(\.json)
        }
        return JSONResponse.make(.ok, ["verifications": .array(list)])
    }
    for kind in ["document", "document/back", "selfie"] {
        api.post("verifications/:id/\(kind)") { request, context in
            try await simulator.uploadRoute(request, context: context, kind: kind)
        }
    }
    api.post("verifications/:id/liveness/session") { _, context in
        let id = try simulator.pending(context.parameters.get("id"))
        let number = simulator.state.withLockedValue { state in
            state.livenessSessions += 1
            return state.livenessSessions
        }
        return JSONResponse.make(
            .created,
            [
                "sessionId": .string("lvs_\(number)_" + RandomID.make()), "verificationId": .string(id),
                "challenges": [["type": "blink"], ["type": "turn_left"], ["type": "smile"]],
                "expiresAt": .string(simulator.configuration.clock().adding(.seconds(600)).iso8601Seconds),
            ])
    }
    api.post("verifications/:id/liveness/challenge") { request, context in
        let id = try simulator.pending(context.parameters.get("id"))
        _ = try await BodyReader.collect(request, channel: context.channel, limit: 65536, timeout: .seconds(10))
        return JSONResponse.make(.ok, ["verificationId": .string(id), "challengeId": .string("chl_" + RandomID.make()), "passed": true])
    }
    api.post("verifications/:id/liveness/frames") { request, context in
        try await simulator.uploadRoute(request, context: context, kind: "liveness/frames")
    }
    api.get("verifications/:id/liveness") { _, context in
        let verification = try simulator.existing(context.parameters.get("id"))
        return JSONResponse.make(
            .ok, ["verificationId": verification["id"] ?? .null, "status": "passed", "score": .number("0.97"), "challengesPassed": 3])
    }
    api.post("verifications/:id/complete") { _, context in
        guard let id = context.parameters.get("id"), let verification = try simulator.complete(id) else { throw KoraSimulator.notFound }
        return JSONResponse.make(.ok, verification)
    }
    api.post("verifications/:id/review") { request, context in try await simulator.reviewRoute(request, context: context) }
    api.get("verifications/:id/images") { request, context in
        try simulator.imagesRoute(request, id: context.parameters.get("id"), type: nil)
    }
    api.get("verifications/:id/images/:type") { request, context in
        try simulator.imagesRoute(request, id: context.parameters.get("id"), type: context.parameters.get("type"))
    }
    api.get("verifications/:id/report") { _, context in try simulator.reportRoute(id: context.parameters.get("id")) }
    router.get("signed/images/:id/:type") { request, context in
        simulator.signedImageRoute(request, id: context.parameters.get("id"), type: context.parameters.get("type"))
    }
    api.get("alerts") { request, _ in
        let status = request.uri.queryParameters["status"].map(String.init)
        let alerts = simulator.state.withLockedValue { state in
            state.alertOrder.compactMap { state.alerts[$0] }.filter { status == nil || $0.status == status }.map(\.json)
        }
        return JSONResponse.make(.ok, ["alerts": .array(alerts)])
    }
    api.post("alerts/:id/resolve") { request, context in
        let body = try await BodyReader.collect(request, channel: context.channel, limit: 65536, timeout: .seconds(10))
        let input = (try? JSONParser.parse(Array(body.readableBytesView))) ?? .object([])
        let now = simulator.configuration.clock()
        let alert: JSONValue? = simulator.state.withLockedValue { state in
            guard let id = context.parameters.get("id"), var alert = state.alerts[id] else { return nil }
            alert.status = "resolved"
            alert.resolvedAt = now
            alert.resolution = input["resolution"]?.text ?? "resolved"
            alert.notes = input["notes"]?.text
            state.alerts[id] = alert
            return alert.json
        }
        guard let alert else { throw SidecarHTTPError(.notFound, code: "NOT_FOUND", message: "Alert not found") }
        return JSONResponse.make(.ok, alert)
    }
    api.get("document-types") { request, _ in
        let country = request.uri.queryParameters["country"].map { String($0).uppercased() } ?? "US"
        let types: [JSONValue] = [
            ["code": "passport", "name": "Passport", "country": .string(country), "sides": 1],
            ["code": "drivers_license", "name": "Driver's licence", "country": .string(country), "sides": 2],
            ["code": "national_id", "name": "National identity card", "country": .string(country), "sides": 2],
        ]
        return JSONResponse.make(.ok, ["country": .string(country), "documentTypes": .array(types)])
    }
    return router
}

extension KoraSimulator {
    static let notFound = SidecarHTTPError(.notFound, code: "NOT_FOUND", message: "Verification not found")

    /// The verification `id`, or 404.
    func existing(_ id: String?) throws -> JSONValue {
        guard let id, let verification = verification(id) else { throw Self.notFound }
        return verification
    }

    /// The id of verification `id` when it still accepts uploads; 404 or 409 otherwise.
    func pending(_ id: String?) throws -> String {
        guard let id else { throw Self.notFound }
        let status = state.withLockedValue { $0.verifications[id]?.status }
        guard let status else { throw Self.notFound }
        guard status == "pending" else { throw Self.invalidState("Verification is \(status); uploads are accepted while it is pending.") }
        return id
    }

    /// `POST /verifications`.
    func createRoute(_ request: Request, context: SidecarRequestContext) async throws -> Response {
        let body = try await BodyReader.collect(request, channel: context.channel, limit: 1 << 20, timeout: .seconds(10))
        guard let input = try? JSONParser.parse(Array(body.readableBytesView)), case .object = input else {
            return Self.validationFailed([("body", "must be a JSON object")])
        }
        guard case .string(let externalID)? = input["externalId"], !externalID.isEmpty else {
            return Self.validationFailed([("externalId", "externalId is required")])
        }
        let tier = input["tier"]?.text ?? "standard"
        guard ["basic", "standard", "enhanced"].contains(tier) else {
            return Self.validationFailed([("tier", "tier must be one of basic, standard, enhanced")])
        }
        let callback = input["callbackUrl"]?.text
        if let problem = callback.flatMap({ HTTPURL.problem($0, credentials: true) }) {
            return Self.validationFailed([("callbackUrl", "callbackUrl \(problem)")])
        }
        let verification = create(
            externalID: externalID, tier: tier, tenantID: request.headers[SimulatorGate.tenantHeader] ?? "",
            callbackURL: callback, documentType: input["documentType"]?.text, metadata: input["metadata"])
        return JSONResponse.make(.created, verification.json)
    }

    /// An image upload (`document`, `document/back`, `selfie`) or liveness frames.
    func uploadRoute(_ request: Request, context: SidecarRequestContext, kind: String) async throws -> Response {
        let id = try pending(context.parameters.get("id"))
        let body = try await BodyReader.collect(
            request, channel: context.channel, limit: configuration.maxBodyBytes, timeout: .seconds(60))
        let bytes = Array(body.readableBytesView)
        let upload: SimulatedUpload
        if kind == "liveness/frames" {
            upload = SimulatedUpload(bytes)
        } else {
            guard let range = Self.imageBase64Range(in: bytes) else {
                return Self.validationFailed([("imageBase64", "imageBase64 is required")])
            }
            upload = SimulatedUpload(bytes[range])
        }
        state.withLockedValue { $0.verifications[id]?.uploads[kind] = upload }
        return JSONResponse.make(
            .ok,
            [
                "success": true, "verificationId": .string(id), "imageType": .string(kind), "size": .int(upload.bytes),
                "quality": ["score": .number("0.92"), "issues": []],
            ])
    }

    /// Where the `imageBase64` string's content lies in a JSON body (the parser keeps raw ranges,
    /// so a multi-megabyte image is not copied again).
    static func imageBase64Range(in body: [UInt8]) -> Range<Int>? {
        guard let member = (try? JSONParser.parse(body))?.member("imageBase64"), case .string(let text) = member.value, !text.isEmpty
        else { return nil }
        let range = member.rawRange
        guard range.count >= 2 else { return nil }
        return (range.lowerBound + 1)..<(range.upperBound - 1)
    }

    /// `POST /verifications/{id}/review` with `X-Reviewer-ID` and `{decision, notes?}`.
    func reviewRoute(_ request: Request, context: SidecarRequestContext) async throws -> Response {
        guard let reviewer = request.headers[SimulatorGate.reviewerHeader], !reviewer.isEmpty else {
            return Self.validationFailed([("X-Reviewer-ID", "the X-Reviewer-ID header is required")])
        }
        let body = try await BodyReader.collect(request, channel: context.channel, limit: 65536, timeout: .seconds(10))
        let input = try? JSONParser.parse(Array(body.readableBytesView))
        guard let decision = input?["decision"]?.text, decision == "approve" || decision == "reject" else {
            return Self.validationFailed([("decision", "decision must be approve or reject")])
        }
        guard let id = context.parameters.get("id"),
            let verification = try review(id, approve: decision == "approve", reviewer: reviewer, notes: input?["notes"]?.text)
        else { throw Self.notFound }
        return JSONResponse.make(.ok, verification)
    }

    /// Kora's validation error shape: `{"message", "errors": [{"field", "message"}]}`.
    static func validationFailed(_ errors: [(field: String, message: String)]) -> Response {
        JSONResponse.make(
            .badRequest,
            [
                "message": "Validation failed",
                "errors": .array(errors.map { ["field": .string($0.field), "message": .string($0.message)] }),
            ])
    }
}

/// In front of every route: the rate limit (with `X-RateLimit-*` on every answer) and the Bearer
/// API key; `/health` and signed image URLs need neither (they carry no key whose budget to count).
struct SimulatorGate: RouterMiddleware {
    let simulator: KoraSimulator

    static let tenantHeader = HTTPField.Name("X-Tenant-ID")!
    static let reviewerHeader = HTTPField.Name("X-Reviewer-ID")!
    static let limitHeader = HTTPField.Name("X-RateLimit-Limit")!
    static let remainingHeader = HTTPField.Name("X-RateLimit-Remaining")!
    static let resetHeader = HTTPField.Name("X-RateLimit-Reset")!

    func handle(
        _ request: Request, context: SidecarRequestContext, next: (Request, SidecarRequestContext) async throws -> Response
    ) async throws -> Response {
        if request.uri.path == "/api/v1/idv/health" || request.uri.path.hasPrefix("/signed/") { return try await next(request, context) }
        let count = simulator.countRequest()
        var limitHeaders = HTTPFields()
        limitHeaders[Self.limitHeader] = String(count.limit)
        limitHeaders[Self.remainingHeader] = String(count.remaining)
        limitHeaders[Self.resetHeader] = String(count.reset)
        if let retryAfter = count.retryAfter {
            limitHeaders[.retryAfter] = String(retryAfter)
            return JSONResponse.make(
                .tooManyRequests,
                [
                    "code": "RATE_LIMIT_EXCEEDED", "error": "Rate limit exceeded. Please retry after the reset time.",
                    "details": ["retryAfter": .int(Int(retryAfter))],
                ], headers: limitHeaders)
        }
        var response: Response
        if let problem = authenticate(request) {
            response = JSONResponse.make(problem.status, ["code": .string(problem.code), "error": .string(problem.message)])
        } else {
            response = try await next(request, context)
        }
        for field in limitHeaders { response.headers[field.name] = field.value }
        return response
    }

    private func authenticate(_ request: Request) -> SidecarHTTPError? {
        guard let header = request.headers[.authorization], let key = ServiceIdentity.bearerToken(header), !key.isEmpty else {
            return SidecarHTTPError(.unauthorized, code: "UNAUTHORIZED", message: "Missing or invalid API key")
        }
        let keys = simulator.configuration.apiKeys
        var known = keys.isEmpty
        for candidate in keys where ConstantTime.equal(String(key), candidate) { known = true }
        guard known else { return SidecarHTTPError(.unauthorized, code: "UNAUTHORIZED", message: "Invalid API key") }
        guard let tenant = request.headers[Self.tenantHeader], !tenant.isEmpty else {
            return SidecarHTTPError(.badRequest, code: "MISSING_TENANT_ID", message: "X-Tenant-ID header is required")
        }
        if let expected = simulator.configuration.tenantID, !ConstantTime.equal(tenant, expected) {
            return SidecarHTTPError(.forbidden, code: "TENANT_MISMATCH", message: "The API key does not belong to this tenant")
        }
        return nil
    }
}

/// Runs the simulator's background work: webhook sends (with retries) and the delayed steps of
/// auto-completion, `test-slow-` and `test-expired-`. Cancelled on shutdown.
struct SimulatorWorker: Service {
    let simulator: KoraSimulator
    let client: HTTPClient
    let logger: Logger

    func run() async throws {
        await withDiscardingTaskGroup { group in
            for await job in simulator.jobs.cancelOnGracefulShutdown() {
                group.addTask { await perform(job) }
            }
            group.cancelAll()
        }
    }

    private func perform(_ job: SimulatorJob) async {
        switch job {
        case .deliver(let events, let targets):
            for event in events {
                for target in targets { await send(event, to: target) }
            }
        case .later(let delay, let id, let action):
            do { try await Task.sleep(for: delay) } catch { return }
            for next in simulator.perform(action, id: id) { await perform(next) }
        case .sequence(let jobs):
            for next in jobs { await perform(next) }
        }
    }

    /// Sends one event to one URL, signed with the timestamped scheme; retries while not answered 2xx.
    private func send(_ event: PreparedEvent, to target: WebhookTarget) async {
        let configuration = simulator.configuration
        var attempt = 0
        while !Task.isCancelled {
            attempt += 1
            var headers: [(name: String, value: String)] = [("Content-Type", "application/json")]
            headers += KoraSignature.headers(
                scheme: .timestamped, secret: configuration.webhookSecret, body: event.body, timestamp: configuration.clock().seconds)
            headers += [("X-Webhook-ID", event.id), ("X-Event-Type", event.type), ("User-Agent", "Kora-Webhooks/1.0 (kora-sidecar simulate)")]
            var request = HTTPClientRequest(url: target.url)
            request.method = .POST
            for header in headers { request.headers.add(name: header.name, value: header.value) }
            request.body = .bytes(ByteBuffer(bytes: event.body))
            var record = SentWebhook(
                eventID: event.id, eventType: event.type, verificationID: event.verificationID, url: target.url,
                destination: target.destination, attempt: attempt, statusCode: nil, response: "", body: event.body, headers: headers)
            do {
                let response = try await client.execute(request, timeout: .seconds(15))
                let answer = (try? await response.body.collect(upTo: 4096)) ?? ByteBuffer()
                record.statusCode = Int(response.status.code)
                record.response = String(buffer: answer)
            } catch {
                record.response = HTTPClientFailure.describe(error)
            }
            logger.info(
                "Webhook sent",
                metadata: [
                    "webhook.id": "\(event.id)", "webhook.type": "\(event.type)", "webhook.destination": "\(target.destination.rawValue)",
                    "webhook.status": "\(record.statusCode.map(String.init) ?? "-")", "webhook.attempt": "\(attempt)",
                ])
            await simulator.sent.append(record)
            guard !record.accepted, attempt <= configuration.webhookRetryDelays.count else { return }
            do { try await Task.sleep(for: configuration.webhookRetryDelays[attempt - 1]) } catch { return }
        }
    }
}
