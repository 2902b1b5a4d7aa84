import Crypto
import KoraSidecarCore

/// A service that receives events, resolved from its configuration once at start-up.
package struct DeliveryService: Sendable {
    package let name: String
    /// Where it listens; nil for a URL the configuration would have refused.
    let endpoint: DeliveryEndpoint?
    package let format: DeliveryFormat
    /// The Standard Webhooks keys, the current one first; none sends no `webhook-signature`.
    let signingKeys: [SymmetricKey]
    package let headers: [(name: String, value: Secret)]
    package let events: EventFilter
    package let onlyOwnVerifications: Bool
    package let timeout: Duration
    /// Consecutive failed attempts that pause the service.
    let breakerFailures: Int
    /// Most deliveries a second, per replica; nil: no limit.
    let maxPerSecond: Int?
    /// Paths removed from the normalised body before it is sent.
    let redact: [RedactionPath]

    init(name: String, deliver: DeliverConfiguration) {
        self.name = name
        self.endpoint = DeliveryEndpoint(deliver.target)
        self.format = deliver.format
        self.signingKeys = [deliver.signingSecret, deliver.previousSigningSecret].compactMap { $0.flatMap(StandardWebhooks.key(from:)) }
        self.headers = deliver.headers
        self.events = deliver.events
        self.onlyOwnVerifications = deliver.onlyOwnVerifications
        self.timeout = .seconds(deliver.timeoutSeconds)
        self.breakerFailures = deliver.breakerFailures
        self.maxPerSecond = deliver.maxPerSecond
        self.redact = deliver.redact
    }
}

extension SidecarConfiguration {
    /// The services that receive events, resolved for delivery.
    package var deliveryServices: [DeliveryService] {
        services.compactMap { service in service.deliver.map { DeliveryService(name: service.name, deliver: $0) } }
    }
}

extension SidecarConfiguration {
    /// Said at start-up (`serve` logs them, `check-config` prints them) about a configuration that
    /// runs but cannot do all its work: with no service, the API proxy has nobody to let call it;
    /// with no service that has `deliver`, every accepted webhook is kept as unrouted.
    package var startupWarnings: [String] {
        var warnings: [String] = []
        if services.isEmpty {
            warnings.append("No service is configured (services): the API proxy refuses every call with 401; add one, with a token or without.")
        }
        if services.allSatisfy({ $0.deliver == nil }) {
            warnings.append(
                "No service receives events (no services[].deliver): accepted webhooks are kept as unrouted until one does; "
                    + "then run `kora-sidecar deliveries retry --unrouted`.")
        }
        return warnings
    }
}
