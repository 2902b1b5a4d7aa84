import Hummingbird
import KoraSidecarCore
import NIOCore

/// `/admin/*` on the internal listener: what the `deliveries` and `erase` commands do, for scripts
/// and the console, through ``OperatorActions`` so that both say the same thing in the same shape.
struct AdminRoutes {
    let configuration: SidecarConfiguration
    let store: any SidecarStore
    let origins: VerificationOrigins?
    let readiness: Readiness
    let metrics: SidecarMetrics
    let breakers: ServiceBreakers
    let dispatcher: OutboxDispatcher?

    func add(to admin: RouterGroup<SidecarRequestContext>) {
        let store = store
        let services = configuration.deliveryServices
        let eventRouter = EventRouter(services: services, store: store, origins: origins)
        admin.get("deliveries") { request, _ in
            let query = request.uri.queryParameters
            let limit = query["limit"].flatMap { Int($0) }.map { min(max($0, 1), 1000) } ?? 100
            let listing = try query["status"].map { text in
                guard let listing = OperatorActions.Listing(rawValue: String(text)) else {
                    throw SidecarHTTPError(.badRequest, code: "INVALID_STATUS", message: "status must be \(OperatorActions.Listing.choices).")
                }
                return listing
            }
            let before = try query["before"].map { text in
                guard let id = Int64(text) else { throw SidecarHTTPError(.badRequest, code: "INVALID_CURSOR", message: "before must be a delivery id.") }
                return id
            }
            let page = try await OperatorActions.page(listing, filter: try DeliveryFilter(query: query), before: before, limit: limit, store: store)
            return JSONResponse.make(.ok, ["deliveries": page.entries, "next": .optional(page.next.map(String.init))])
        }
        admin.post("deliveries/retry") { request, _ in
            let selection = try OperatorActions.RetrySelection(query: request.uri.queryParameters)
            let outcome = try await OperatorActions.retry(selection, store: store, router: eventRouter)
            if !selection.dryRun { dispatcher?.notify(services: services.map(\.name)) }
            return JSONResponse.make(.ok, outcome.json)
        }
        admin.post("events/:id/replay") { request, context in
            // The id as the console sends it, percent-encoded (`sha256:…` of a body without an id); one
            // that does not decode names no event.
            let eventID = context.parameters.get("id")?.percentDecoded ?? ""
            let service = request.uri.queryParameters["service"].map(String.init)
            let outcome = try await OperatorActions.retry(.replay(eventID: eventID, service: service), store: store, router: eventRouter)
            guard outcome.selected > 0 else {
                if outcome.bodyGone > 0 { throw Self.bodyGone("The event's body is gone (retention or erasure): it cannot be sent again.") }
                // Asked twice: the first replay's deliveries are still waiting to be sent.
                let pending = try await OperatorActions.pendingDeliveries(ofEvent: eventID, service: service, store: store)
                if pending > 0 { return JSONResponse.make(.ok, ["eventId": .string(eventID), "requeued": 0, "alreadyQueued": .int(pending)]) }
                throw SidecarHTTPError(.notFound, code: "NOT_FOUND", message: "The event has no delivered or dead delivery to send again.")
            }
            dispatcher?.notify(services: services.map(\.name))
            return JSONResponse.make(.ok, ["eventId": .string(eventID), "requeued": .int(outcome.selected)])
        }
        admin.get("services") { _, _ in
            JSONResponse.make(.ok, ["services": .array(breakers.all.map(\.listingJSON))])
        }
        admin.get("overview") { _, _ in try await overview() }
        admin.get("deliveries/:id") { _, context in
            guard let id = context.parameters.get("id").flatMap({ Int64($0) }), let detail = try await store.delivery(id: id) else {
                throw SidecarHTTPError(.notFound, code: "NOT_FOUND", message: "There is no such delivery.")
            }
            return JSONResponse.make(.ok, OperatorActions.show(detail, services: services))
        }
        admin.post("deliveries/:id/retry") { _, context in
            let id = context.parameters.get("id").flatMap { Int64($0) } ?? 0
            switch try await OperatorActions.retry(deliveryID: id, store: store) {
            case .requeued:
                dispatcher?.notify(services: services.map(\.name))
                return JSONResponse.make(.ok, ["requeued": .int(Int(id))])
            case .bodyGone(let problem):
                throw Self.bodyGone("The delivery's body is gone (\(problem.state)): it cannot be sent again.")
            case .notFound:
                throw SidecarHTTPError(.notFound, code: "NOT_FOUND", message: "There is no such delivery waiting to be retried.")
            }
        }
        admin.post("erase") { request, context in
            // A JSON body only: a browser cannot send one cross-site without asking first (CORS),
            // so a page elsewhere cannot erase through a sidecar that runs without adminToken.
            guard request.headers[.contentType]?.lowercased().hasPrefix("application/json") == true else {
                throw SidecarHTTPError(.unsupportedMediaType, code: "UNSUPPORTED_MEDIA_TYPE", message: "Send the erasure as Content-Type: application/json.")
            }
            let body = try await BodyReader.collect(request, channel: context.channel, limit: 65536, logger: context.logger)
            let subject = try Self.erasureSubject(Array(buffer: body))
            let report = try await OperatorActions.erase(subject, store: store, logger: context.logger)
            return JSONResponse.make(.ok, report.json)
        }
    }

    private static func bodyGone(_ message: String) -> SidecarHTTPError {
        SidecarHTTPError(.conflict, code: "BODY_GONE", message: message)
    }

    /// `{"verificationId": …}` or `{"externalId": …}`.
    static func erasureSubject(_ bytes: [UInt8]) throws(SidecarHTTPError) -> OperatorActions.ErasureSubject {
        let json = try? JSONParser.parse(bytes)
        let invalid = SidecarHTTPError(
            .badRequest, code: "INVALID_REQUEST", message: "Send a JSON object with exactly one of verificationId and externalId, a non-empty string.")
        // Present is present, whatever it holds (null too): an erasure cannot be undone.
        switch (json?["verificationId"], json?["externalId"]) {
        case (let value?, nil):
            guard let id = value.text, !id.isEmpty else { throw invalid }
            // An id no store can hold (a control character, over 1 KiB) names no stored verification;
            // PostgreSQL would refuse a NUL in it. (An external id is looked for inside the bodies.)
            guard let storable = EventNormalizer.storableID(id) else {
                throw SidecarHTTPError(
                    .badRequest, code: "INVALID_REQUEST", message: "verificationId must be 1 to 1024 bytes without control characters.")
            }
            return .verification(storable)
        case (nil, let value?):
            guard let id = value.text, !id.isEmpty else { throw invalid }
            return .externalID(id)
        default:
            throw invalid
        }
    }

    /// What the console's overview shows: readiness, webhooks per minute by result, and each
    /// service's outbox and breaker state.
    private func overview() async throws -> Response {
        let depth = try await store.depth()
        let problem = await readiness.problem()
        // Each service as /admin/services shows it, with its outbox.
        let services: [JSONValue] = breakers.all.map { breaker in
            guard case .object(var members) = breaker.listingJSON else { return .null }
            let outbox = depth.filter { $0.service == breaker.service }
            for status in DeliveryStatus.allCases {
                members.append(.init(status.rawValue, .int(outbox.first { $0.status == status }?.count ?? 0)))
            }
            members.append(.init("oldestPendingAt", .optional(outbox.first { $0.status == .pending }?.oldestSince?.iso8601Milliseconds)))
            return .object(members)
        }
        return JSONResponse.make(
            .ok,
            [
                "ready": .bool(problem == nil), "readinessProblem": .optional(problem), "deliveryMode": .string(configuration.delivery.mode.rawValue),
                "webhooksPerMinute": .array(
                    metrics.webhookMinutes.last(60, now: .now()).map { minute in
                        ["minute": .string(minute.start.iso8601Seconds), "counts": .object(minute.counts.sorted { $0.key < $1.key }.map { .init($0.key, .int($0.value)) })]
                    }),
                "services": .array(services), "unrouted": .int(try await store.unroutedCount()),
                "quarantined": .int(try await store.quarantinedCount()),
            ])
    }
}

extension DeliveryFilter {
    /// The conditions of the admin API's query: `service`, `type`, `verification`, `since`, `until`
    /// (ISO 8601 or a duration ago); no status.
    init(query: Parameters) throws(SidecarHTTPError) {
        func time(_ name: Substring) throws(SidecarHTTPError) -> UnixTime? {
            guard let text = query[name], !text.isEmpty else { return nil }
            guard let time = UnixTime.parse(String(text), now: .now()) else {
                throw SidecarHTTPError(.badRequest, code: "INVALID_TIME", message: "\(name) must be an ISO 8601 time or a duration such as 24h.")
            }
            return time
        }
        func text(_ name: Substring) -> String? { query[name].flatMap { $0.isEmpty ? nil : String($0) } }
        self.init(
            statuses: [], service: text("service"), eventType: text("type"), verificationID: text("verification"), since: try time("since"),
            until: try time("until"))
    }
}

extension OperatorActions.RetrySelection {
    /// The selection of `POST /admin/deliveries/retry`: `status` (required), the conditions of
    /// ``DeliveryFilter/init(query:)`` and `dryRun`.
    init(query: Parameters) throws(SidecarHTTPError) {
        let filter = try DeliveryFilter(query: query)
        guard let status = query["status"], let selection = Self(status: String(status), filter: filter, dryRun: query["dryRun"] == "true")
        else {
            throw SidecarHTTPError(.badRequest, code: "INVALID_STATUS", message: "status must be \(Self.statusChoices).")
        }
        self = selection
    }
}
