/// The whole configuration of one sidecar, validated, with every secret resolved (SPEC §3).
public struct SidecarConfiguration: Sendable {
    public var kora: KoraConfiguration
    public var webhooks: WebhookConfiguration
    public var `internal`: InternalConfiguration
    public var metrics = MetricsConfiguration()
    public var services: [ServiceConfiguration]
    public var delivery: DeliveryConfiguration
    public var storage: StorageConfiguration
    public var logging: LoggingConfiguration

    public init(
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
public enum ListenAddress: Sendable, Equatable {
    case tcp(host: String, port: Int)
    case unixSocket(path: String)
}

/// Limits every listener enforces (size, time, connections).
public struct ListenerLimits: Sendable, Equatable {
    /// Largest request body accepted; larger answers 413.
    public var maxBodyBytes: Int
    /// Largest total size of the request headers.
    public var maxHeaderBytes: Int = 16 * 1024
    /// Time allowed to receive a whole request body.
    public var readTimeoutSeconds: Int = 10
    /// Time before an idle keep-alive connection is closed.
    public var idleTimeoutSeconds: Int = 60
    /// Most connections open at once; more wait in the kernel's backlog.
    public var maxConnections: Int = 1024

    public init(maxBodyBytes: Int) { self.maxBodyBytes = maxBodyBytes }
}

/// The Kora API the proxy talks to (`kora`).
public struct KoraConfiguration: Sendable {
    public var apiBaseURL = "https://api.korastratum.com/api/v1/idv"
    public var apiKey: Secret?
    public var tenantId: Secret?
    public var callbackURL: String?
    public var timeoutSeconds = 30
    public var retry = RetryConfiguration()

    public init() {}
}

/// Retries of calls to Kora (`kora.retry`).
public struct RetryConfiguration: Sendable, Equatable {
    public var maxAttempts = 3
    public var initialDelayMilliseconds = 1000
    public var maxDelayMilliseconds = 30000

    public init() {}
}

/// Kora's two signature generations (KORA.md §3).
public enum SignatureScheme: String, Sendable, CaseIterable {
    case timestamped
    case legacy
}

/// TLS on the public listener (`webhooks.tls`).
public struct TLSFiles: Sendable, Equatable {
    public var certificateFile: String
    public var privateKeyFile: String
}

/// The public webhook listener (`webhooks`).
public struct WebhookConfiguration: Sendable {
    public var listen = ListenAddress.tcp(host: "0.0.0.0", port: 8080)
    public var tls: TLSFiles?
    public var path = "/webhooks/koraidv"
    public var secrets: [Secret]
    public var schemes: [SignatureScheme] = [.timestamped, .legacy]
    public var toleranceSeconds = 300
    public var enforce = true
    public var dedupWindowHours = 168
    public var limits = ListenerLimits(maxBodyBytes: 1_048_576)

    public init(secrets: [Secret]) { self.secrets = secrets }
}

/// The internal listener: API proxy, health, metrics, admin (`internal`).
public struct InternalConfiguration: Sendable {
    public var listen = ListenAddress.tcp(host: "127.0.0.1", port: 8081)
    public var adminToken: Secret?
    public var limits = ListenerLimits(maxBodyBytes: 26_214_400)

    public init() {}
}

/// The optional metrics listener (`metrics`): `/metrics`, `/healthz` and `/readyz` only, so that
/// Prometheus and the kubelet can reach them on the pod's address without reaching the proxy.
public struct MetricsConfiguration: Sendable {
    /// Where it binds; nil (the default) runs no metrics listener.
    public var listen: ListenAddress?
    public var limits = ListenerLimits(maxBodyBytes: 65_536)

    public init() {}
}

/// One internal service: who it is on the API proxy and where its events go (`services[]`).
public struct ServiceConfiguration: Sendable {
    public var name: String
    public var token: Secret?
    /// `METHOD /path` patterns this service may call; nil allows everything.
    public var allow: [String]?
    public var deliver: DeliverConfiguration?

    public init(name: String, token: Secret? = nil, allow: [String]? = nil, deliver: DeliverConfiguration? = nil) {
        self.name = name
        self.token = token
        self.allow = allow
        self.deliver = deliver
    }
}

/// Where a service receives its events.
public enum DeliveryTarget: Sendable, Equatable {
    /// An `http://` or `https://` URL.
    case url(String)
    /// A Unix domain socket and the request path on it.
    case unixSocket(socketPath: String, path: String)
}

/// The body a service receives (SPEC §6).
public enum DeliveryFormat: String, Sendable, CaseIterable {
    case normalized
    case original
}

/// How events reach one service (`services[].deliver`).
public struct DeliverConfiguration: Sendable {
    public var target: DeliveryTarget
    public var format = DeliveryFormat.normalized
    /// The Standard Webhooks key (`whsec_…`); nil sends no `webhook-signature`.
    public var signingSecret: Secret?
    public var headers: [(name: String, value: Secret)] = []
    public var events: EventFilter = .all
    public var onlyOwnVerifications = false
    public var timeoutSeconds = 15

    public init(target: DeliveryTarget) { self.target = target }
}

/// `direct` or `queued` delivery (SPEC §4.5).
public enum DeliveryMode: String, Sendable, CaseIterable {
    case queued
    case direct
}

/// How the sidecar delivers (`delivery`).
public struct DeliveryConfiguration: Sendable {
    public var mode = DeliveryMode.queued
    public var retrySchedule: [Duration] = ["5s", "30s", "2m", "10m", "30m", "1h", "2h", "4h", "8h", "12h"]
        .compactMap(DurationText.parse)
    public var concurrency = 16
    /// How long in-flight deliveries may take to finish on SIGTERM before the process exits anyway.
    public var drainTimeout = Duration.seconds(10)

    public init() {}
}

/// Where state is kept (`storage`).
public struct StorageConfiguration: Sendable {
    public var sqlitePath = "./data/kora-sidecar.sqlite"
    /// `postgres://user:password@host:5432/database?sslmode=require`: when set, state is kept in
    /// PostgreSQL, shared by every replica, and `sqlitePath` is not used.
    public var postgresURL: Secret?

    public init() {}
}

/// Log level and line format (`logging`).
public struct LoggingConfiguration: Sendable {
    /// One of swift-log's levels: trace, debug, info, notice, warning, error, critical.
    public var level = "info"
    public var format = LogFormat.json

    public init() {}
}

/// How log lines are written.
public enum LogFormat: String, Sendable, CaseIterable {
    case json
    case text
}
