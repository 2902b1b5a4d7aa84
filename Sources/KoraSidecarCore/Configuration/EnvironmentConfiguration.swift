import Crypto
/// The environment-only start: with no configuration file, one service (`app`) is built from the
/// variables Kora's own integration guide already uses, plus `KORA_SIDECAR_*` for the rest a
/// one-app container needs. docs/configuration.md lists every variable.
enum EnvironmentConfiguration {
    /// A configuration document equivalent to the environment: secrets stay `{"env": …}` references
    /// so that the file loader resolves, validates and masks them exactly as for a file.
    package static func document(_ environment: [String: String]) -> JSONValue {
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
        // A socket replaces host and port: it is how a pod's containers share the listener.
        if let socket = env("KORA_SIDECAR_INTERNAL_SOCKET") {
            internalListener.append(.init("listen", ["unixSocket": .string(socket)]))
        } else {
            var listen: [JSONMember] = []
            if let host = env("KORA_SIDECAR_INTERNAL_HOST") { listen.append(.init("host", .string(host))) }
            if let port = port("KORA_SIDECAR_INTERNAL_PORT") { listen.append(.init("port", port)) }
            if !listen.isEmpty { internalListener.append(.init("listen", .object(listen))) }
        }
        if env("KORA_SIDECAR_ADMIN_TOKEN") != nil { internalListener.append(.init("adminToken", reference("KORA_SIDECAR_ADMIN_TOKEN"))) }

        var service: [JSONMember] = [.init("name", "app")]
        if env("KORA_SIDECAR_SERVICE_TOKEN") != nil { service.append(.init("token", reference("KORA_SIDECAR_SERVICE_TOKEN"))) }
        var deliver: [JSONMember] = []
        if let url = env("KORA_SIDECAR_FORWARD_URL") { deliver.append(.init("url", .string(url))) }
        if let socket = env("KORA_SIDECAR_FORWARD_SOCKET") { deliver.append(.init("unixSocket", .string(socket))) }
        // Also beside a URL, where the loader refuses it rather than it being dropped unseen.
        if let path = env("KORA_SIDECAR_FORWARD_PATH") ?? (env("KORA_SIDECAR_FORWARD_SOCKET") != nil ? "/kora-events" : nil) {
            deliver.append(.init("path", .string(path)))
        }
        if env("KORA_SIDECAR_SIGNING_SECRET") != nil { deliver.append(.init("signingSecret", reference("KORA_SIDECAR_SIGNING_SECRET"))) }
        if let format = env("KORA_SIDECAR_DELIVERY_FORMAT") { deliver.append(.init("format", .string(format))) }
        if let events = env("KORA_SIDECAR_EVENTS") {
            let patterns = events.split(separator: ",").map { JSONValue.string(String($0.trimmingSpaces)) }
            deliver.append(.init("events", .array(patterns)))
        }
        // Delivery settings without a destination are reported (by the loader), not ignored.
        if !deliver.isEmpty { service.append(.init("deliver", .object(deliver))) }

        var document: [JSONMember] = [
            .init("kora", .object(kora)),
            .init("webhooks", .object(webhooks)),
            .init("internal", .object(internalListener)),
            .init("services", [.object(service)]),
        ]
        if let port = port("KORA_SIDECAR_METRICS_PORT") { document.append(.init("metrics", ["listen": ["port": port]])) }
        if let mode = env("KORA_SIDECAR_DELIVERY_MODE") { document.append(.init("delivery", ["mode": .string(mode)])) }
        if env("KORA_SIDECAR_DATABASE_URL") != nil {
            document.append(.init("storage", ["postgresURL": reference("KORA_SIDECAR_DATABASE_URL")]))
        } else if let path = env("KORA_SIDECAR_SQLITE_PATH") {
            document.append(.init("storage", ["sqlitePath": .string(path)]))
        }
        if let key = env("KORA_SIDECAR_ENCRYPTION_KEY") {
            var storage = document.last?.key == "storage" ? document.removeLast().value : [:]
            if case .object(var members) = storage {
                // Named after the key itself, so that rows sealed under an earlier value report that key as missing.
                let id = "env-" + Hex.encode(SHA256.hash(data: Array(key.utf8))).prefix(8)
                members.append(.init("encryption", ["keys": [["id": .string(id), "key": reference("KORA_SIDECAR_ENCRYPTION_KEY")]]]))
                storage = .object(members)
            }
            document.append(.init("storage", storage))
        }
        var logging: [JSONMember] = []
        if let level = env("KORA_SIDECAR_LOG_LEVEL") { logging.append(.init("level", .string(level))) }
        if let format = env("KORA_SIDECAR_LOG_FORMAT") { logging.append(.init("format", .string(format))) }
        if !logging.isEmpty { document.append(.init("logging", .object(logging))) }
        return .object(document)
    }

    /// The variable behind each JSON path of ``document(_:)``: a problem is reported under the
    /// name the user wrote, not a path in a file they never saw.
    static let variables: [(path: String, variable: String)] = [
        ("$.webhooks.secrets", "KORAIDV_WEBHOOK_SECRET"),
        ("$.webhooks.listen", "KORA_SIDECAR_WEBHOOK_PORT"),
        ("$.kora.apiKey", "KORAIDV_API_KEY"),
        ("$.kora.tenantId", "KORAIDV_TENANT_ID"),
        ("$.kora.callbackURL", "KORA_SIDECAR_CALLBACK_URL"),
        ("$.kora.apiBaseURL", "KORA_SIDECAR_API_BASE_URL"),
        ("$.internal.listen.unixSocket", "KORA_SIDECAR_INTERNAL_SOCKET"),
        ("$.internal.listen.host", "KORA_SIDECAR_INTERNAL_HOST"),
        ("$.internal.listen", "KORA_SIDECAR_INTERNAL_PORT"),
        ("$.internal.adminToken", "KORA_SIDECAR_ADMIN_TOKEN"),
        ("$.metrics.listen", "KORA_SIDECAR_METRICS_PORT"),
        ("$.services[0].token", "KORA_SIDECAR_SERVICE_TOKEN"),
        ("$.services[0].deliver.url", "KORA_SIDECAR_FORWARD_URL"),
        ("$.services[0].deliver.unixSocket", "KORA_SIDECAR_FORWARD_SOCKET"),
        ("$.services[0].deliver.path", "KORA_SIDECAR_FORWARD_PATH"),
        ("$.services[0].deliver.signingSecret", "KORA_SIDECAR_SIGNING_SECRET"),
        ("$.services[0].deliver.format", "KORA_SIDECAR_DELIVERY_FORMAT"),
        ("$.services[0].deliver.events", "KORA_SIDECAR_EVENTS"),
        ("$.services[0].deliver", "KORA_SIDECAR_FORWARD_URL or KORA_SIDECAR_FORWARD_SOCKET"),
        ("$.delivery.mode", "KORA_SIDECAR_DELIVERY_MODE"),
        ("$.storage.sqlitePath", "KORA_SIDECAR_SQLITE_PATH"),
        ("$.storage.postgresURL", "KORA_SIDECAR_DATABASE_URL"),
        ("$.storage.encryption", "KORA_SIDECAR_ENCRYPTION_KEY"),
        ("$.logging.level", "KORA_SIDECAR_LOG_LEVEL"),
        ("$.logging.format", "KORA_SIDECAR_LOG_FORMAT"),
    ]

    /// The variables that are settings, not secrets a configuration file may also name with `{"env": …}`.
    static let settings = variables.map(\.variable).filter { name in
        name.hasPrefix("KORA_SIDECAR_") && !name.contains(" ")
            && !["KORA_SIDECAR_ADMIN_TOKEN", "KORA_SIDECAR_SERVICE_TOKEN", "KORA_SIDECAR_SIGNING_SECRET", "KORA_SIDECAR_DATABASE_URL",
                 "KORA_SIDECAR_ENCRYPTION_KEY"].contains(name)
    }

    /// What start-up says about the environment beside the configuration from `source`: settings
    /// that a configuration file makes no difference to, and a misspelt variable, which the
    /// environment-only start would otherwise ignore (others under the prefix, such as those
    /// Kubernetes makes for a Service named kora-sidecar, are not ours to judge).
    static func warnings(_ environment: [String: String], source: ConfigurationSource) -> [String] {
        let set = environment.filter { !$0.value.isEmpty }.keys
        switch source {
        case .file(let path):
            let ignored = settings.filter { set.contains($0) }
            guard !ignored.isEmpty else { return [] }
            return [
                "\(ignored.joined(separator: ", ")) \(ignored.count == 1 ? "is" : "are") set, but the configuration comes from \(path): "
                    + "these variables apply only without a configuration file (remove the file, or set the keys in it)."
            ]
        case .environment:
            let known = Set(variables.map(\.variable) + ["KORA_SIDECAR_CONFIG"])
            return set.filter { $0.hasPrefix("KORA_SIDECAR_") && !known.contains($0) }.sorted().compactMap { name in
                guard let meant = known.sorted().first(where: { TextDistance.atMost(2, $0, name) }) else { return nil }
                return "\(name) is set, which kora-sidecar does not read: did you mean \(meant)?"
            }
        }
    }

    /// `error` with each problem's path replaced by the variable it came from (the first entry of
    /// ``variables`` that is a prefix of the path).
    static func naming(variablesIn error: ConfigurationError) -> ConfigurationError {
        var error = error
        error.problems = error.problems.map { problem in
            guard let entry = variables.first(where: { problem.path.hasPrefix($0.path) }) else { return problem }
            let unset = "environment variable \(entry.variable) is not set"
            return ConfigurationProblem(path: entry.variable, reason: problem.reason == unset ? "is not set" : problem.reason)
        }
        return error
    }
}
