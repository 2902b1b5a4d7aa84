import KoraSidecarCore

/// Decides which services receive an event: the `events` filter, and for `onlyOwnVerifications`
/// the service that created the verification through the API proxy.
struct EventRouter: Sendable {
    package let services: [DeliveryService]
    private let store: any SidecarStore
    /// Where origins are looked up: the store, and what `serve`'s proxy could not write yet.
    private let origins: VerificationOrigins?

    init(services: [DeliveryService], store: any SidecarStore, origins: VerificationOrigins? = nil) {
        self.services = services
        self.store = store
        self.origins = origins
    }

    /// The services that receive `event`.
    func recipients(of event: KoraEvent) async throws -> [DeliveryService] {
        try await recipients(type: event.type, verificationID: event.verificationID)
    }

    /// The services that receive an event of `type` about `verificationID`.
    func recipients(type: String, verificationID: String?) async throws -> [DeliveryService] {
        var origin: String??
        var recipients: [DeliveryService] = []
        for service in services where service.events.matches(type) {
            if service.onlyOwnVerifications {
                if origin == nil {
                    origin = .some(try await verificationID.asyncFlatMap(origin(of:)))
                }
                guard origin! == service.name else { continue }
            }
            recipients.append(service)
        }
        return recipients
    }
}

/// What routing the unrouted events again did.
struct RerouteResult: Sendable, Equatable {
    /// Events that now have deliveries.
    var routedEvents: Int
    /// Deliveries created for them.
    package var deliveries: Int
    /// Events that still match no service.
    var stillUnrouted: Int
}

extension EventRouter {
    /// The service that created verification `id`, if known.
    private func origin(of id: String) async throws -> String? {
        if let origins { return try await origins.origin(of: id) }
        return try await store.origin(ofVerification: id)
    }

    /// Routes the store's unrouted events again with these services (once the configuration
    /// changed): each event `filter` selects (its event conditions; its service limits the
    /// recipients) that now matches a service gets its deliveries, due at `now`. With `dryRun`,
    /// only counts what would be routed.
    func routeUnrouted(at now: UnixTime, filter: DeliveryFilter? = nil, dryRun: Bool = false) async throws -> RerouteResult {
        var assignments: [(eventRow: Int64, services: [String])] = []
        for event in try await store.unrouted(limit: nil)
        where filter?.selectsEvent(type: event.eventType, verificationID: event.verificationID, eventID: event.eventID, at: event.receivedAt) ?? true {
            let names = try await recipients(type: event.eventType, verificationID: event.verificationID).map(\.name)
            assignments.append((event.row, names.filter { name in filter?.service.map { $0 == name } ?? true }))
        }
        let routed = assignments.filter { !$0.services.isEmpty }
        let deliveries = dryRun ? routed.reduce(0) { $0 + $1.services.count } : try await store.route(routed, at: now)
        return RerouteResult(routedEvents: routed.count, deliveries: deliveries, stillUnrouted: assignments.count - routed.count)
    }
}

extension Optional {
    fileprivate func asyncFlatMap<U>(_ transform: (Wrapped) async throws -> U?) async rethrows -> U? {
        guard let value = self else { return nil }
        return try await transform(value)
    }
}
