import Hummingbird
import KoraSidecarCore
import NIOCore

/// The internal listener's routes: health, readiness, the admin API over the outbox and, when
/// given, the Kora API proxy (SPEC §5.1).
func buildInternalRouter(
    configuration: SidecarConfiguration, store: any SidecarStore, readiness: Readiness, metrics: SidecarMetrics,
    breakers: ServiceBreakers, proxy: KoraProxy? = nil, dispatcher: OutboxDispatcher? = nil
) -> Router<SidecarRequestContext> {
    let router = Router(context: SidecarRequestContext.self)
    router.add(middleware: ErrorShapeMiddleware())
    addHealthRoutes(to: router, configuration: configuration, store: store, readiness: readiness, metrics: metrics, breakers: breakers)
    let admin = router.group("admin").add(middleware: AdminTokenMiddleware(token: configuration.internal.adminToken))
    admin.get("deliveries") { request, _ in
        let limit = request.uri.queryParameters["limit"].flatMap { Int($0) }.map { min(max($0, 1), 1000) } ?? 100
        let listing = try request.uri.queryParameters["status"].map { text in
            guard let listing = OperatorActions.Listing(rawValue: String(text)) else {
                throw SidecarHTTPError(.badRequest, code: "INVALID_STATUS", message: "status must be \(OperatorActions.Listing.choices).")
            }
            return listing
        }
        return JSONResponse.make(.ok, ["deliveries": try await OperatorActions.list(listing, limit: limit, store: store)])
    }
    let eventRouter = EventRouter(services: configuration.deliveryServices, store: store)
    admin.post("deliveries/retry") { request, _ in
        let query = request.uri.queryParameters
        let selection = try OperatorActions.RetrySelection(query: query)
        let outcome = try await OperatorActions.retry(selection, store: store, router: eventRouter)
        if !selection.dryRun { dispatcher?.notify(services: configuration.deliveryServices.map(\.name)) }
        return JSONResponse.make(.ok, outcome.json)
    }
    admin.post("events/:id/replay") { request, context in
        let eventID = context.parameters.get("id") ?? ""
        let service = request.uri.queryParameters["service"].map(String.init)
        let outcome = try await OperatorActions.retry(.replay(eventID: eventID, service: service), store: store, router: eventRouter)
        guard outcome.selected > 0 else {
            throw SidecarHTTPError(.notFound, code: "NOT_FOUND", message: "The event has no delivered or dead delivery to send again.")
        }
        dispatcher?.notify(services: configuration.deliveryServices.map(\.name))
        return JSONResponse.make(.ok, ["eventId": .string(eventID), "requeued": .int(outcome.selected)])
    }
    admin.get("services") { _, _ in
        JSONResponse.make(.ok, ["services": .array(breakers.all.map(\.listingJSON))])
    }
    admin.get("deliveries/:id") { _, context in
        guard let id = context.parameters.get("id").flatMap({ Int64($0) }), let detail = try await store.delivery(id: id) else {
            throw SidecarHTTPError(.notFound, code: "NOT_FOUND", message: "There is no such delivery.")
        }
        return JSONResponse.make(.ok, detail.listingJSON)
    }
    admin.post("deliveries/:id/retry") { _, context in
        guard let id = context.parameters.get("id").flatMap({ Int64($0) }), try await store.requeue(id: id, at: .now()) else {
            throw SidecarHTTPError(.notFound, code: "NOT_FOUND", message: "There is no such delivery waiting to be retried.")
        }
        return JSONResponse.make(.ok, ["requeued": .int(Int(id))])
    }
    if let proxy {
        for method in [HTTPRequest.Method.get, .head, .post, .put, .patch, .delete, .options] {
            router.on("/api/v1/**", method: method) { request, context in try await proxy.forward(request, context: context) }
        }
        router.post("/api/verifications") { request, context in try await proxy.createShortcut(request, context: context) }
    }
    return router
}

/// The routes of the optional metrics listener: what Prometheus and the kubelet may reach from
/// outside the pod, and nothing else (no proxy, no admin API).
func buildMetricsRouter(
    configuration: SidecarConfiguration, store: any SidecarStore, readiness: Readiness, metrics: SidecarMetrics, breakers: ServiceBreakers
) -> Router<SidecarRequestContext> {
    let router = Router(context: SidecarRequestContext.self)
    router.add(middleware: ErrorShapeMiddleware())
    addHealthRoutes(to: router, configuration: configuration, store: store, readiness: readiness, metrics: metrics, breakers: breakers)
    return router
}

/// `GET /healthz`, `/readyz` and `/metrics`, on the internal listener and the metrics listener.
private func addHealthRoutes(
    to router: Router<SidecarRequestContext>, configuration: SidecarConfiguration, store: any SidecarStore, readiness: Readiness,
    metrics: SidecarMetrics, breakers: ServiceBreakers
) {
    router.get("/healthz") { _, _ in JSONResponse.make(.ok, ["status": "ok"]) }
    router.get("/readyz") { _, _ in
        if let problem = await readiness.problem() {
            return JSONResponse.make(.serviceUnavailable, ["status": "not ready", "reason": .string(problem)])
        }
        return JSONResponse.make(.ok, ["status": "ready"])
    }
    let serviceNames = configuration.deliveryServices.map(\.name)
    router.get("/metrics") { _, _ in
        let text = await metrics.render(store: store, services: serviceNames, readiness: readiness, breakers: breakers, now: .now())
        return Response(
            status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
            body: .init(byteBuffer: ByteBuffer(string: text)))
    }
}

/// Turns Hummingbird's own errors (no route, wrong method) and unexpected failures into the
/// `{"code", "error"}` shape; an unexpected error becomes a bare 500 that leaks nothing.
package struct ErrorShapeMiddleware: RouterMiddleware {
    package init() {}

    package func handle(_ request: Request, context: SidecarRequestContext, next: (Request, SidecarRequestContext) async throws -> Response) async throws -> Response {
        do {
            return try await next(request, context)
        } catch let error as SidecarHTTPError {
            return error.response(channel: context.channel)
        } catch let error as HTTPError {
            let code = error.status == .notFound ? "NOT_FOUND" : error.status == .methodNotAllowed ? "METHOD_NOT_ALLOWED" : "BAD_REQUEST"
            return SidecarHTTPError(error.status, code: code, message: error.status.reasonPhrase + ".").response(channel: nil)
        } catch {
            context.logger.error("Unexpected error", metadata: ["error.type": "\(type(of: error))"])
            return SidecarHTTPError(.internalServerError, code: "INTERNAL", message: "Internal error.").response(channel: nil)
        }
    }
}

/// Guards `/admin/*` with `internal.adminToken` when it is set (constant-time comparison).
struct AdminTokenMiddleware: RouterMiddleware {
    let token: Secret?

    func handle(_ request: Request, context: SidecarRequestContext, next: (Request, SidecarRequestContext) async throws -> Response) async throws -> Response {
        if let token {
            let given = request.headers[.authorization].flatMap(ServiceIdentity.bearerToken)
            guard let given, ConstantTime.equal(String(given), token.value) else {
                throw SidecarHTTPError(.unauthorized, code: "UNAUTHORIZED", message: "The admin API needs Authorization: Bearer with internal.adminToken.")
            }
        }
        return try await next(request, context)
    }
}

extension OperatorActions.RetrySelection {
    /// The selection of `POST /admin/deliveries/retry`: `status` (required), `service`, `type`,
    /// `verification`, `since`, `until` (ISO 8601 or a duration ago) and `dryRun`.
    init(query: Parameters) throws(SidecarHTTPError) {
        func time(_ name: Substring) throws(SidecarHTTPError) -> UnixTime? {
            guard let text = query[name] else { return nil }
            guard let time = UnixTime.parse(String(text), now: .now()) else {
                throw SidecarHTTPError(.badRequest, code: "INVALID_TIME", message: "\(name) must be an ISO 8601 time or a duration such as 24h.")
            }
            return time
        }
        let filter = DeliveryFilter(
            statuses: [], service: query["service"].map(String.init), eventType: query["type"].map(String.init),
            verificationID: query["verification"].map(String.init), since: try time("since"), until: try time("until"))
        guard let status = query["status"], let selection = Self(status: String(status), filter: filter, dryRun: query["dryRun"] == "true")
        else {
            throw SidecarHTTPError(.badRequest, code: "INVALID_STATUS", message: "status must be \(Self.statusChoices).")
        }
        self = selection
    }
}
