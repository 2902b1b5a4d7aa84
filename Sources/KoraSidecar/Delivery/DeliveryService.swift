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
        if case .tcp(let host, let port) = self.internal.listen, !ListenAddress.isLoopback(host) {
            if self.internal.adminToken == nil {
                warnings.append(
                    "The internal listener is on \(host):\(port), not loopback, and internal.adminToken is not set: anyone who reaches it can read, "
                        + "replay and erase events through /admin; set internal.adminToken, or listen on 127.0.0.1 or a Unix socket.")
            }
            if let open = services.first(where: { $0.token == nil }) {
                warnings.append(
                    "The internal listener is on \(host):\(port), not loopback, and service \(open.name) has no token: anyone who reaches it "
                        + "can call Kora with the sidecar's API key; give it a token, or listen on 127.0.0.1 or a Unix socket.")
            }
        } else if services.count > 1, self.internal.adminToken == nil {
            warnings.append(
                "Several services share the internal listener and internal.adminToken is not set: any of them can read, replay and erase "
                    + "every service's events through /admin; set internal.adminToken.")
        }
        for service in services {
            for pattern in service.deliver?.events.unknownPatterns ?? [] {
                warnings.append(
                    "Service \(service.name) receives events matching \"\(pattern)\", which matches none of the types Kora documents "
                        + "(\(EventFilter.knownTypes.filter { !$0.hasPrefix(EventFilter.sidecarPrefix) }.sorted().joined(separator: ", "))): "
                        + "check services[].deliver.events for a typo.")
            }
        }
        return warnings
    }
}
