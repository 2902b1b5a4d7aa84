/// The whole configuration of one sidecar, validated, with every secret resolved (SPEC §3).
public struct SidecarConfiguration: Sendable {
    package var kora: KoraConfiguration
    package var webhooks: WebhookConfiguration
    package var `internal`: InternalConfiguration
    package var metrics = MetricsConfiguration()
    package var services: [ServiceConfiguration]
    package var delivery: DeliveryConfiguration
    package var storage: StorageConfiguration
    package var logging: LoggingConfiguration

    package init(
        kora: KoraConfiguration = .init(),
        webhooks: WebhookConfiguration,
        internal: InternalConfiguration = .init(),
        services: [ServiceConfiguration] = [],
        delivery: DeliveryConfiguration = .init(),
        storage: StorageConfiguration = .init(),
        logging: LoggingConfiguration = .init()
    ) {
        self.kora = kora
        self.webhooks = webhooks
        self.internal = `internal`
        self.services = services
        self.delivery = delivery
        self.storage = storage
        self.logging = logging
    }
}

/// Where a listener binds.
package enum ListenAddress: Sendable, Equatable {
    case tcp(host: String, port: Int)
    case unixSocket(path: String)

    /// Whether binding `host` keeps a listener on this machine: `localhost`, `127.0.0.0/8` or `::1`.
    package static func isLoopback(_ host: String) -> Bool {
        let host = host.lowercased()
        return host == "localhost" || host == "::1" || host == "[::1]" || host.hasPrefix("127.")
    }
}

/// Limits every listener enforces (size, time, connections).
package struct ListenerLimits: Sendable, Equatable {
    /// Largest request body accepted; larger answers 413.
    package var maxBodyBytes: Int
    /// Largest total size of the request headers.
    package var maxHeaderBytes: Int = 16 * 1024
    /// Time allowed to receive a whole request body.
    package var readTimeoutSeconds: Int = 10
    /// Time before an idle keep-alive connection is closed.
    package var idleTimeoutSeconds: Int = 60
    /// Most connections open at once; more wait in the kernel's backlog.
    package var maxConnections: Int = 1024

    package init(maxBodyBytes: Int) { self.maxBodyBytes = maxBodyBytes }
}

/// The Kora API the proxy talks to (`kora`).
package struct KoraConfiguration: Sendable {
    package var apiBaseURL = "https://api.korastratum.com/api/v1/idv"
    package var apiKey: Secret?
    package var tenantId: Secret?
    package var callbackURL: String?
    package var timeoutSeconds = 30
    package var retry = RetryConfiguration()
    package var rateLimit = KoraRateLimit()

    package init() {}
}

/// Retries of calls to Kora (`kora.retry`).
package struct RetryConfiguration: Sendable, Equatable {
    package var maxAttempts = 3
    package var initialDelayMilliseconds = 1000
    package var maxDelayMilliseconds = 30000

    package init() {}
}

/// The Kora key's budget (`kora.rateLimit`): calls a minute, shared by every service.
package struct KoraRateLimit: Sendable, Equatable {
    /// The plan's limit; nil learns it from Kora's `X-RateLimit-Limit`.
    package var perMinute: Int?
    /// The limits the budget takes, configured or learned (a larger one is a misread header).
    package static let perMinuteRange = 1...100_000
    /// How long a call waits for its turn before it is answered 429 `RATE_LIMITED`.
    package var maxWait = Duration.seconds(10)

    package init() {}
}

/// Kora's two signature generations (KORA.md §3).
public enum SignatureScheme: String, Sendable, CaseIterable {
    case timestamped
    case legacy
}

/// TLS on the public listener (`webhooks.tls`).
package struct TLSFiles: Sendable, Equatable {
    package var certificateFile: String
    package var privateKeyFile: String
}

/// The public webhook listener (`webhooks`).
package struct WebhookConfiguration: Sendable {
    package var listen = ListenAddress.tcp(host: "0.0.0.0", port: 8080)
    package var tls: TLSFiles?
    package var path = "/webhooks/koraidv"
    package var secrets: [Secret]
    package var schemes: [SignatureScheme] = [.timestamped, .legacy]
    package var toleranceSeconds = 300
    package var enforce = true
    package var dedupWindowHours = 168
    package var limits = ListenerLimits(maxBodyBytes: 1_048_576)

    package init(secrets: [Secret]) { self.secrets = secrets }
}

/// The internal listener: API proxy, health, metrics, admin (`internal`).
package struct InternalConfiguration: Sendable {
    package var listen = ListenAddress.tcp(host: "127.0.0.1", port: 8081)
    package var adminToken: Secret?
    /// Host names this listener answers without a token, besides IP addresses and `localhost`
    /// (lowercase): names the operator chose, which no web page can point here.
    package var allowedHosts: Set<String> = []
    package var limits = ListenerLimits(maxBodyBytes: 26_214_400)

    init() {}

    /// Letters, digits, hyphens and dots: a DNS name, with no scheme, port or path.
    static func isHostName(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count <= 253
            && name.utf8.allSatisfy { ($0 >= 0x61 && $0 <= 0x7A) || ($0 >= 0x41 && $0 <= 0x5A) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x2D || $0 == 0x2E }
    }
}

/// The optional metrics listener (`metrics`): `/metrics`, `/healthz` and `/readyz` only, so that
/// Prometheus and the kubelet can reach them on the pod's address without reaching the proxy.
package struct MetricsConfiguration: Sendable {
    /// Where it binds; nil (the default) runs no metrics listener.
    package var listen: ListenAddress?
    package var limits = ListenerLimits(maxBodyBytes: 65_536)

    init() {}
}

/// One internal service: who it is on the API proxy and where its events go (`services[]`).
package struct ServiceConfiguration: Sendable {
    package var name: String
    package var token: Secret?
    /// `METHOD /path` patterns this service may call; nil allows everything.
    package var allow: [String]?
    package var deliver: DeliverConfiguration?
    /// Its weight in the Kora budget when calls wait: turns in proportion to it.
    package var share = 1

    package init(name: String, token: Secret? = nil, allow: [String]? = nil, deliver: DeliverConfiguration? = nil) {
        self.name = name
        self.token = token
        self.allow = allow
        self.deliver = deliver
    }
}

/// Where a service receives its events.
package enum DeliveryTarget: Sendable, Equatable {
    /// An `http://` or `https://` URL.
    case url(String)
    /// A Unix domain socket and the request path on it.
    case unixSocket(socketPath: String, path: String)
}

/// The body a service receives (SPEC §6).
package enum DeliveryFormat: String, Sendable, CaseIterable {
    case normalized
    case original
}

/// How events reach one service (`services[].deliver`).
package struct DeliverConfiguration: Sendable {
    package var target: DeliveryTarget
    package var format = DeliveryFormat.normalized
    /// The Standard Webhooks key (`whsec_…`); nil sends no `webhook-signature`.
    package var signingSecret: Secret?
    /// The key being replaced, while receivers move to `signingSecret`: each delivery then carries
    /// a signature by each, and a receiver holding either verifies it (Standard Webhooks tries them all).
    package var previousSigningSecret: Secret?
    package var headers: [(name: String, value: Secret)] = []
    package var events: EventFilter = .all
    package var onlyOwnVerifications = false
    package var timeoutSeconds = 15
    /// Consecutive failed attempts that pause the service (`breaker.failures`).
    package var breakerFailures = 5
    /// Most deliveries a second to this service, per replica (`maxPerSecond`); nil: no limit.
    package var maxPerSecond: Int?
    /// What this service never receives: paths removed from the normalised body (`redact`).
    package var redact: [RedactionPath] = []

    package init(target: DeliveryTarget) { self.target = target }

    /// Header names the sidecar sets itself; configuration may not override them.
    static let reservedHeaders: Set<String> = [
        "webhook-id", "webhook-timestamp", "webhook-signature", "content-type", "content-length", "host",
        "x-kora-event-type", "x-kora-delivery-attempt", "x-kora-signature-verified", "transfer-encoding", "connection",
    ]
}

/// `direct` or `queued` delivery (SPEC §4.5).
package enum DeliveryMode: String, Sendable, CaseIterable {
    case queued
    case direct
}

/// Whether the events of one verification reach a service in the order they were accepted.
package enum DeliveryOrdering: String, Sendable, CaseIterable {
    /// A later event of a verification waits while an earlier one is pending for that service.
    case verification
    /// Each delivery goes when it is due (a retry may let a later event overtake an earlier one).
    case none
}

/// How the sidecar delivers (`delivery`).
package struct DeliveryConfiguration: Sendable {
    package var mode = DeliveryMode.queued
    package var ordering = DeliveryOrdering.verification
    package var retrySchedule: [Duration] = ["5s", "30s", "2m", "10m", "30m", "1h", "2h", "4h", "8h", "12h"]
        .compactMap(DurationText.parse)
    package var concurrency = 16
    /// How long in-flight deliveries may take to finish on SIGTERM before the process exits anyway.
    package var drainTimeout = Duration.seconds(10)
    /// PEM certificate authorities trusted for `https` services besides the system's.
    package var caFile: String?

    init() {}
}

/// Where state is kept (`storage`).
package struct StorageConfiguration: Sendable {
    package var sqlitePath = "./data/kora-sidecar.sqlite"
    /// `postgres://user:password@host:5432/database?sslmode=require`: when set, state is kept in
    /// PostgreSQL, shared by every replica, and `sqlitePath` is not used.
    package var postgresURL: Secret?
    /// `storage.encryption.keys`: the first seals, all open. Empty with SQLite: a key file beside
    /// the store is created on first start (``StorageConfiguration/keyFilePath``).
    package var encryptionKeys: [EncryptionKeyEntry] = []
    /// How long an event's body is kept once every delivery of it was delivered (`0s`: not at all).
    package var payloadRetention = Duration.seconds(86_400)
    /// How long a dead delivery's event keeps its body, so that it can be retried.
    package var deadRetention = Duration.seconds(7 * 86_400)

    package init() {}

    /// The key file a SQLite store uses when no key is configured: beside the store, mode 0600.
    package var keyFilePath: String { sqlitePath + ".key" }
}

/// One entry of `storage.encryption.keys`.
package struct EncryptionKeyEntry: Sendable {
    package var id: String
    /// The base64 text of 32 bytes.
    package var key: Secret

    package init(id: String, key: Secret) {
        self.id = id
        self.key = key
    }
}

/// Log level and line format (`logging`).
package struct LoggingConfiguration: Sendable {
    /// One of swift-log's levels: trace, debug, info, notice, warning, error, critical.
    package var level = "info"
    package var format = LogFormat.json

    init() {}
}

/// How log lines are written.
package enum LogFormat: String, Sendable, CaseIterable {
    case json
    case text
}
