/// Decides which services receive an event: the `events` filter, and for `onlyOwnVerifications`
/// the service that created the verification through the API proxy.
public struct EventRouter: Sendable {
    public let services: [DeliveryService]
    private let store: any SidecarStore

    public init(services: [DeliveryService], store: any SidecarStore) {
        self.services = services
        self.store = store
    }

    /// The services that receive `event`.
    public func recipients(of event: KoraEvent) async throws -> [DeliveryService] {
        var origin: String??
        var recipients: [DeliveryService] = []
        for service in services where service.events.matches(event.type) {
            if service.onlyOwnVerifications {
                if origin == nil {
                    origin = .some(try await event.verificationID.asyncFlatMap { try await store.origin(ofVerification: $0) })
                }
                guard origin! == service.name else { continue }
            }
            recipients.append(service)
        }
        return recipients
    }
}

extension Optional {
    fileprivate func asyncFlatMap<U>(_ transform: (Wrapped) async throws -> U?) async rethrows -> U? {
        guard let value = self else { return nil }
        return try await transform(value)
    }
}
