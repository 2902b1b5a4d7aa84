import KoraSidecarCore

/// Decides which services receive an event: the `events` filter, and for `onlyOwnVerifications`
/// the service that created the verification through the API proxy.
struct EventRouter: Sendable {
    package let services: [DeliveryService]
    private let store: any SidecarStore

    init(services: [DeliveryService], store: any SidecarStore) {
        self.services = services
        self.store = store
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
                    origin = .some(try await verificationID.asyncFlatMap { try await store.origin(ofVerification: $0) })
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
    /// Routes every unrouted event of the store again with these services (once the configuration
    /// changed): each event that now matches a service gets its deliveries, due at `now`.
    func routeUnrouted(at now: UnixTime) async throws -> RerouteResult {
        var assignments: [(eventRow: Int64, services: [String])] = []
        for event in try await store.unrouted(limit: nil) {
            assignments.append((event.row, try await recipients(type: event.eventType, verificationID: event.verificationID).map(\.name)))
        }
        let routed = assignments.filter { !$0.services.isEmpty }
        let deliveries = try await store.route(routed, at: now)
        return RerouteResult(routedEvents: routed.count, deliveries: deliveries, stillUnrouted: assignments.count - routed.count)
    }
}

extension Optional {
    fileprivate func asyncFlatMap<U>(_ transform: (Wrapped) async throws -> U?) async rethrows -> U? {
        guard let value = self else { return nil }
        return try await transform(value)
    }
}
