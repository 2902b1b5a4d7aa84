import HTTPTypes
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
    router.add(middleware: WebPageGuard(configuration: configuration))
    addHealthRoutes(to: router, configuration: configuration, store: store, readiness: readiness, metrics: metrics, breakers: breakers)
    addConsoleRoutes(to: router)
    let admin = router.group("admin").add(middleware: AdminTokenMiddleware(token: configuration.internal.adminToken))
    AdminRoutes(
        configuration: configuration, store: store, origins: proxy?.origins, readiness: readiness, metrics: metrics, breakers: breakers,
        dispatcher: dispatcher
    ).add(to: admin)
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

/// Guards `/admin/*` with `internal.adminToken` when it is set (constant-time comparison), and marks
/// its answers `no-store`: they hold bodies with identity data.
struct AdminTokenMiddleware: RouterMiddleware {
    let token: Secret?

    func handle(_ request: Request, context: SidecarRequestContext, next: (Request, SidecarRequestContext) async throws -> Response) async throws -> Response {
        if let token {
            let given = request.headers[.authorization].flatMap(ServiceIdentity.bearerToken)
            guard let given, ConstantTime.equal(String(given), token.value) else {
                throw SidecarHTTPError(.unauthorized, code: "UNAUTHORIZED", message: "The admin API needs Authorization: Bearer with internal.adminToken.")
            }
        }
        var response = try await next(request, context)
        // No cache on the way (a proxy, the client's) keeps a body.
        if response.headers[.cacheControl] == nil { response.headers[.cacheControl] = "no-store" }
        return response
    }
}

/// Keeps web pages out of the internal listener, where the admin API and the proxy answer
/// without a token unless one is configured. Any page an operator has open can send requests to
/// loopback, and the listener refuses two kinds:
///
/// - A change (any method but GET and HEAD) that a browser marks as sent by a page of another
///   origin. Otherwise a page could post to the admin API (resend every delivered event) or
///   create verifications through the proxy as the service without a token.
/// - A request whose `Host` is a DNS name, unless it carries a token the listener knows. This is
///   DNS rebinding: a page of `attacker.example` gets its name answered with 127.0.0.1 while an
///   operator's tunnel is open. Its requests are then same-origin, and a browser marks none of
///   them (no `Origin` on a GET, no `Sec-Fetch-*` to a plain-HTTP name). Such a page knows no
///   token, and cannot use an IP address, `localhost`, or a name the operator listed in
///   `internal.allowedHosts`.
///
/// Health, readiness and metrics hold no identity data and answer any name.
struct WebPageGuard: RouterMiddleware {
    let allowedHosts: Set<String>
    /// `internal.adminToken` and every service's token.
    let tokens: [[UInt8]]

    init(configuration: SidecarConfiguration) {
        allowedHosts = configuration.internal.allowedHosts
        tokens = ([configuration.internal.adminToken] + configuration.services.map(\.token)).compactMap { $0?.bytes }
    }

    func handle(_ request: Request, context: SidecarRequestContext, next: (Request, SidecarRequestContext) async throws -> Response) async throws -> Response {
        if request.method != .get, request.method != .head, Self.isFromAnotherOrigin(request) {
            throw SidecarHTTPError(.forbidden, code: "FORBIDDEN", message: "This listener takes no changes from a web page of another origin.")
        }
        guard Self.openPaths.contains(request.uri.path) || Self.isAllowed(authority: request.head.authority, names: allowedHosts) || carriesToken(request)
        else {
            let host = request.head.authority.map { String($0.prefix(100)) } ?? ""
            throw SidecarHTTPError(
                .forbidden, code: "FORBIDDEN",
                message: "This listener answers the name \(host) only with internal.adminToken or a service's token: "
                    + "list the name in internal.allowedHosts, or use an IP address or localhost.")
        }
        return try await next(request, context)
    }

    /// Whether a browser says the request comes from a page of another origin: `Sec-Fetch-Site`
    /// other than `same-origin` or `none` (typed by the user), else an `Origin` that is not this
    /// listener's own (`Host`). Another port on the same host is another origin.
    static func isFromAnotherOrigin(_ request: Request) -> Bool {
        if let site = request.headers[.secFetchSite] { return site != "same-origin" && site != "none" }
        guard let origin = request.headers[.origin] else { return false }
        guard let host = request.head.authority else { return true }
        return origin != "http://" + host && origin != "https://" + host
    }

    /// Whether the request's bearer token is one of `tokens` (each compared in constant time).
    private func carriesToken(_ request: Request) -> Bool {
        guard let header = request.headers[.authorization], let given = ServiceIdentity.bearerToken(header) else { return false }
        return ConstantTime.firstMatch(Array(given.utf8), in: tokens) != nil
    }

    private static let openPaths: Set<String> = ["/healthz", "/readyz", "/metrics"]

    /// Whether `authority` (`host[:port]`; nil without a `Host`, which no browser sends) is an IP
    /// address, `localhost` or one of `names`: a name no web page can point here.
    static func isAllowed(authority: String?, names: Set<String>) -> Bool {
        guard let authority = authority?.lowercased(), !authority.isEmpty else { return true }
        var host = Substring(authority)
        if host.hasPrefix("["), let close = host.firstIndex(of: "]") {
            host = host[host.index(after: host.startIndex)..<close]
        } else if let colon = host.lastIndex(of: ":"), host.utf8[host.utf8.index(after: colon)...].allSatisfy(\.isASCIIDigit) {
            host = host[..<colon]
        }
        if host.hasSuffix(".") { host = host.dropLast() }
        let name = String(host)
        return name == "localhost" || names.contains(name) || (try? SocketAddress(ipAddress: name, port: 0)) != nil
    }
}

extension HTTPField.Name {
    /// Where a browser says a request comes from (current browsers send it to HTTPS and loopback addresses).
    fileprivate static let secFetchSite = HTTPField.Name("Sec-Fetch-Site")!
}
