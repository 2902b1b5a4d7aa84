/// The environment-only start (SPEC §3.3): with no configuration file, one service is built from the
/// variables Kora's own integration guide already uses.
public enum EnvironmentConfiguration {
    /// Every variable read, with its default and meaning, for the README and `--help`.
    public static let variables: [(name: String, defaultValue: String, meaning: String)] = [
        ("KORAIDV_WEBHOOK_SECRET", "(required)", "Kora webhook secret (whsec_...)"),
        ("KORAIDV_API_KEY", "(unset: API proxy disabled)", "Kora API key injected by the proxy"),
        ("KORAIDV_TENANT_ID", "(unset: API proxy disabled)", "Kora tenant id injected by the proxy"),
        ("KORA_SIDECAR_FORWARD_URL", "(unset)", "where the service receives events over HTTP"),
        ("KORA_SIDECAR_FORWARD_SOCKET", "(unset)", "or: the Unix socket where it receives them"),
        ("KORA_SIDECAR_FORWARD_PATH", "/kora-events", "request path used with KORA_SIDECAR_FORWARD_SOCKET"),
        ("KORA_SIDECAR_SIGNING_SECRET", "(unset: deliveries unsigned)", "Standard Webhooks secret (whsec_...)"),
        ("KORA_SIDECAR_CALLBACK_URL", "(unset)", "callbackUrl injected into created verifications"),
        ("KORA_SIDECAR_API_BASE_URL", "https://api.korastratum.com/api/v1/idv", "Kora API base URL"),
        ("KORA_SIDECAR_WEBHOOK_PORT", "8080", "public webhook listener port (all interfaces)"),
        ("KORA_SIDECAR_INTERNAL_PORT", "8081", "internal listener port (127.0.0.1)"),
        ("KORA_SIDECAR_DELIVERY_MODE", "queued", "queued or direct"),
        ("KORA_SIDECAR_SQLITE_PATH", "./data/kora-sidecar.sqlite", "SQLite store"),
        ("KORA_SIDECAR_LOG_LEVEL", "info", "trace, debug, info, notice, warning, error, critical"),
        ("KORA_SIDECAR_LOG_FORMAT", "json", "json or text"),
    ]

    /// A configuration document equivalent to the environment: secrets stay `{"env": …}` references
    /// so that the file loader resolves, validates and masks them exactly as for a file.
    public static func document(_ environment: [String: String]) -> JSONValue {
        func env(_ name: String) -> String? { environment[name].flatMap { $0.isEmpty ? nil : $0 } }
        func reference(_ name: String) -> JSONValue { ["env": .string(name)] }
        func port(_ name: String) -> JSONValue? { env(name).map { Int($0).map(JSONValue.int) ?? .string($0) } }

        var kora: [JSONMember] = []
        if env("KORAIDV_API_KEY") != nil { kora.append(.init("apiKey", reference("KORAIDV_API_KEY"))) }
        if env("KORAIDV_TENANT_ID") != nil { kora.append(.init("tenantId", reference("KORAIDV_TENANT_ID"))) }
        if let url = env("KORA_SIDECAR_CALLBACK_URL") { kora.append(.init("callbackURL", .string(url))) }
        if let url = env("KORA_SIDECAR_API_BASE_URL") { kora.append(.init("apiBaseURL", .string(url))) }

        var webhooks: [JSONMember] = [.init("secrets", [reference("KORAIDV_WEBHOOK_SECRET")])]
        if let port = port("KORA_SIDECAR_WEBHOOK_PORT") { webhooks.append(.init("listen", ["port": port])) }
        var internalListener: [JSONMember] = []
        if let port = port("KORA_SIDECAR_INTERNAL_PORT") { internalListener.append(.init("listen", ["port": port])) }

        var service: [JSONMember] = [.init("name", "app")]
        var deliver: [JSONMember] = []
        if let url = env("KORA_SIDECAR_FORWARD_URL") { deliver.append(.init("url", .string(url))) }
        if let socket = env("KORA_SIDECAR_FORWARD_SOCKET") {
            deliver.append(.init("unixSocket", .string(socket)))
            deliver.append(.init("path", .string(env("KORA_SIDECAR_FORWARD_PATH") ?? "/kora-events")))
        }
        if !deliver.isEmpty, env("KORA_SIDECAR_SIGNING_SECRET") != nil {
            deliver.append(.init("signingSecret", reference("KORA_SIDECAR_SIGNING_SECRET")))
        }
        if !deliver.isEmpty { service.append(.init("deliver", .object(deliver))) }

        var document: [JSONMember] = [
            .init("kora", .object(kora)),
            .init("webhooks", .object(webhooks)),
            .init("internal", .object(internalListener)),
            .init("services", [.object(service)]),
        ]
        if let mode = env("KORA_SIDECAR_DELIVERY_MODE") { document.append(.init("delivery", ["mode": .string(mode)])) }
        if env("KORA_SIDECAR_DATABASE_URL") != nil {
            document.append(.init("storage", ["postgresURL": reference("KORA_SIDECAR_DATABASE_URL")]))
        } else if let path = env("KORA_SIDECAR_SQLITE_PATH") {
            document.append(.init("storage", ["sqlitePath": .string(path)]))
        }
        var logging: [JSONMember] = []
        if let level = env("KORA_SIDECAR_LOG_LEVEL") { logging.append(.init("level", .string(level))) }
        if let format = env("KORA_SIDECAR_LOG_FORMAT") { logging.append(.init("format", .string(format))) }
        if !logging.isEmpty { document.append(.init("logging", .object(logging))) }
        return .object(document)
    }
}
