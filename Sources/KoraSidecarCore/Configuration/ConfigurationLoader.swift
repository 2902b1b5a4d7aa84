#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

extension SidecarConfiguration {
    /// Loads and validates a configuration file, resolving its secrets from `environment`.
    /// - Throws: ``ConfigurationError`` with every problem found, each with its JSON path.
    package static func load(file: String, environment: [String: String], resolvingSecrets: Bool = true) throws -> SidecarConfiguration {
        guard let data = FileManager.default.contents(atPath: file) else {
            throw ConfigurationError(source: file, problems: [.init(path: "$", reason: "the file cannot be read")])
        }
        return try load(bytes: Array(data), source: file, environment: environment, resolvingSecrets: resolvingSecrets)
    }

    /// Loads and validates a configuration document given as bytes.
    public static func load(
        bytes: [UInt8], source: String, environment: [String: String], resolvingSecrets: Bool = true
    ) throws -> SidecarConfiguration {
        let document: JSONValue
        do {
            document = try JSONParser.parse(bytes, rejectDuplicateKeys: true)
        } catch {
            let (line, column) = position(of: error.offset, in: bytes)
            throw ConfigurationError(
                source: source,
                problems: [.init(path: "$", reason: "not valid JSON: \(error.reason) (line \(line), column \(column))")]
            )
        }
        return try load(document: document, source: source, environment: environment, resolvingSecrets: resolvingSecrets)
    }

    /// Loads and validates a parsed configuration document.
    /// - Parameter resolvingSecrets: false checks secrets for shape only, without reading any
    ///   variable or file (for commands that need the store alone); such a configuration cannot serve.
    package static func load(
        document: JSONValue, source: String, environment: [String: String], resolvingSecrets: Bool = true
    ) throws -> SidecarConfiguration {
        let reader = ConfigurationReader(environment: environment, resolvesSecrets: resolvingSecrets)
        let configuration = read(document, reader)
        if let configuration, reader.problems.isEmpty {
            return configuration
        }
        throw ConfigurationError(source: source, problems: reader.problems)
    }

    private static func position(of offset: Int, in bytes: [UInt8]) -> (line: Int, column: Int) {
        let prefix = bytes.prefix(offset)
        let line = prefix.count(where: { $0 == 0x0A }) + 1
        let column = offset - (prefix.lastIndex(of: 0x0A).map { $0 + 1 } ?? 0) + 1
        return (line, column)
    }

    private static func read(_ document: JSONValue, _ reader: ConfigurationReader) -> SidecarConfiguration? {
        let root = reader.object(
            document, at: "$", keys: ["kora", "webhooks", "internal", "metrics", "services", "delivery", "storage", "logging"])
        if case .object = document {} else { return nil }
        let webhooks = readWebhooks(root.object("webhooks", keys: WebhookKeys.all), reader)
        var configuration = SidecarConfiguration(webhooks: webhooks)
        configuration.kora = readKora(root.object("kora", keys: KoraKeys.all))
        configuration.internal = readInternal(root.object("internal", keys: InternalKeys.all))
        configuration.metrics = readMetrics(root.object("metrics", keys: Set(["listen"]).union(ListenerLimitKeys.all)))
        configuration.services = root.array("services") { value, path in
            readService(reader.object(value, at: path, keys: ["name", "token", "allow", "deliver", "share"]))
        } ?? []
        configuration.delivery = readDelivery(root.object("delivery", keys: ["mode", "ordering", "retrySchedule", "concurrency", "drainTimeout", "caFile"]))
        configuration.storage = readStorage(
            root.object("storage", keys: ["sqlitePath", "postgresURL", "encryption", "payloadRetention", "deadRetention"]))
        let logging = root.object("logging", keys: ["level", "format"])
        configuration.logging.level = logging.string("level", default: "info")
        if !LoggingConfiguration.levels.contains(configuration.logging.level) {
            reader.report(logging.path("level"), "must be one of \(LoggingConfiguration.levels.joined(separator: ", "))")
        }
        configuration.logging.format = logging.enumeration("format", default: .json)
        validate(configuration, root: root, reader)
        return configuration
    }

    private static func readStorage(_ object: ObjectReader) -> StorageConfiguration {
        var storage = StorageConfiguration()
        storage.sqlitePath = object.string("sqlitePath", default: storage.sqlitePath)
        if storage.sqlitePath.isEmpty { object.reader.report(object.path("sqlitePath"), "must not be empty") }
        let year = Duration.seconds(365 * 86_400)
        storage.payloadRetention = object.duration("payloadRetention", default: storage.payloadRetention, upTo: year, describedAs: "365d")
        storage.deadRetention = object.duration("deadRetention", default: storage.deadRetention, upTo: year, describedAs: "365d")
        storage.encryptionKeys = readEncryptionKeys(object.object("encryption", keys: ["keys"]))
        guard object.has("postgresURL") else { return storage }
        #if !PostgreSQL
        // Nothing else to check about a store this build cannot use.
        object.reader.report(object.path("postgresURL"), StartupError.postgreSQLLeftOut)
        return storage
        #endif
        if object.has("sqlitePath") {
            object.reader.report(object.path("postgresURL"), "give either sqlitePath or postgresURL, not both")
        }
        storage.postgresURL = object.optionalSecret("postgresURL", always: true)
        if let url = storage.postgresURL {
            // The reason never quotes the URL: it holds the database password.
            do { _ = try PostgresURL(url) } catch { object.reader.report(object.path("postgresURL"), error.reason) }
        }
        if storage.encryptionKeys.isEmpty, !object.reader.problems.contains(where: { $0.path.hasPrefix(object.path("encryption")) }) {
            object.reader.report(
                object.path("encryption.keys"),
                "is required with postgresURL: every replica must seal with the same key (32 random bytes in base64, e.g. from "
                    + "`head -c 32 /dev/urandom | base64`)")
        }
        return storage
    }

    /// `storage.encryption.keys`: `[{"id": …, "key": secret}]`, ids unique, each key 32 bytes in base64.
    /// Keys are always resolved: read-only commands open stored bodies too.
    private static func readEncryptionKeys(_ object: ObjectReader) -> [EncryptionKeyEntry] {
        guard object.has("keys") else { return [] }
        var ids = Set<String>()
        let keys: [EncryptionKeyEntry] =
            object.array("keys") { value, path in
                let entry = object.reader.object(value, at: path, keys: ["id", "key"])
                let id = entry.string("id", default: "")
                if !ServiceConfiguration.isValidName(id) {
                    object.reader.report(entry.path("id"), "must be 1 to 64 letters, digits, '-', '_' or '.'")
                } else if !ids.insert(id).inserted {
                    object.reader.report(entry.path("id"), "\"\(id)\" is used by another key")
                }
                guard let key = entry.optionalSecret("key", always: true) else {
                    if !entry.has("key") { object.reader.report(entry.path("key"), "is required") }
                    return nil
                }
                if SealingKey(id: id, base64: key.value) == nil {
                    object.reader.report(entry.path("key"), "must be 32 bytes in base64 (e.g. from `head -c 32 /dev/urandom | base64`)")
                }
                return EncryptionKeyEntry(id: id, key: key)
            } ?? []
        if object.has("keys"), keys.isEmpty, !object.reader.problems.contains(where: { $0.path.hasPrefix(object.path("keys")) }) {
            object.reader.report(object.path("keys"), "must list at least one key")
        }
        return keys
    }

    private enum KoraKeys {
        static let all: Set<String> = ["apiBaseURL", "apiKey", "tenantId", "callbackURL", "timeoutSeconds", "retry", "rateLimit"]
    }

    private static func readKora(_ object: ObjectReader) -> KoraConfiguration {
        var kora = KoraConfiguration()
        kora.apiBaseURL = object.string("apiBaseURL", default: kora.apiBaseURL)
        while kora.apiBaseURL.hasSuffix("/") { kora.apiBaseURL.removeLast() }
        if let problem = HTTPURL.problem(kora.apiBaseURL) { object.reader.report(object.path("apiBaseURL"), problem) }
        kora.apiKey = object.optionalSecret("apiKey")
        kora.tenantId = object.optionalSecret("tenantId")
        kora.callbackURL = object.optionalString("callbackURL")
        // Sent to Kora, which calls it: credentials for a proxy in front of the webhook path may be in it.
        if let url = kora.callbackURL, let problem = HTTPURL.problem(url, credentials: true) {
            object.reader.report(object.path("callbackURL"), problem)
        }
        kora.timeoutSeconds = object.int("timeoutSeconds", default: kora.timeoutSeconds, in: 1...600)
        let retry = object.object("retry", keys: ["maxAttempts", "initialDelayMilliseconds", "maxDelayMilliseconds"])
        kora.retry.maxAttempts = retry.int("maxAttempts", default: kora.retry.maxAttempts, in: 1...20)
        kora.retry.initialDelayMilliseconds = retry.int(
            "initialDelayMilliseconds", default: kora.retry.initialDelayMilliseconds, in: 0...3_600_000)
        kora.retry.maxDelayMilliseconds = retry.int(
            "maxDelayMilliseconds", default: kora.retry.maxDelayMilliseconds, in: 0...3_600_000)
        let rateLimit = object.object("rateLimit", keys: ["perMinute", "maxWait"])
        if rateLimit.has("perMinute") { kora.rateLimit.perMinute = rateLimit.int("perMinute", default: 1, in: KoraRateLimit.perMinuteRange) }
        kora.rateLimit.maxWait = rateLimit.duration("maxWait", default: kora.rateLimit.maxWait, upTo: .seconds(300), describedAs: "5m")
        if kora.retry.maxDelayMilliseconds < kora.retry.initialDelayMilliseconds {
            retry.reader.report(retry.path("maxDelayMilliseconds"), "must not be less than initialDelayMilliseconds")
        }
        return kora
    }

    private enum WebhookKeys {
        static let all = Set([
            "listen", "tls", "path", "secrets", "schemes", "toleranceSeconds", "maxBodyBytes", "enforce",
            "dedupWindowHours",
        ]).union(ListenerLimitKeys.all)
    }

    private static func readWebhooks(_ object: ObjectReader, _ reader: ConfigurationReader) -> WebhookConfiguration {
        let secrets = object.array("secrets") { value, path in reader.secret(value, at: path) }
        if secrets == nil, !object.has("secrets") {
            reader.report(object.path("secrets"), "is required: at least one Kora webhook secret")
        } else if object.value("secrets") == .array([]) {
            reader.report(object.path("secrets"), "must hold at least one secret")
        }
        var webhooks = WebhookConfiguration(secrets: secrets ?? [])
        webhooks.listen = readListen(object, default: webhooks.listen)
        if object.has("tls") {
            let tls = object.object("tls", keys: ["certificateFile", "privateKeyFile"])
            if let certificate = tls.requiredString("certificateFile"), let key = tls.requiredString("privateKeyFile") {
                webhooks.tls = TLSFiles(certificateFile: certificate, privateKeyFile: key)
            }
        }
        webhooks.path = object.string("path", default: webhooks.path)
        if !webhooks.path.hasPrefix("/") || webhooks.path.contains("?") || webhooks.path.contains(" ") {
            reader.report(object.path("path"), "must be a URL path starting with /")
        }
        if let schemes = object.array("schemes", { value, path -> SignatureScheme? in
            guard case .string(let s) = value, let scheme = SignatureScheme(rawValue: s) else {
                reader.report(path, "must be \"timestamped\" or \"legacy\"")
                return nil
            }
            return scheme
        }) {
            if schemes.isEmpty, object.value("schemes") == .array([]) {
                reader.report(object.path("schemes"), "must name at least one scheme")
            }
            webhooks.schemes = schemes
        }
        webhooks.toleranceSeconds = object.int("toleranceSeconds", default: webhooks.toleranceSeconds, in: 1...86_400)
        webhooks.enforce = object.bool("enforce", default: webhooks.enforce)
        webhooks.dedupWindowHours = object.int("dedupWindowHours", default: webhooks.dedupWindowHours, in: 1...8760)
        // A captured webhook passes the signature check for 2 × the tolerance (its X-Timestamp may be
        // that far on either side of the clock): its id must be remembered at least that long.
        if webhooks.dedupWindowHours * 3600 < 2 * webhooks.toleranceSeconds {
            reader.report(
                object.path("dedupWindowHours"),
                "must cover twice webhooks.toleranceSeconds (\(webhooks.toleranceSeconds) s), or a replayed webhook is accepted again: at least \((2 * webhooks.toleranceSeconds + 3599) / 3600)"
            )
        }
        webhooks.limits = readLimits(object, default: webhooks.limits)
        return webhooks
    }

    private enum InternalKeys {
        static let all = Set(["listen", "maxBodyBytes", "adminToken", "allowedHosts"]).union(ListenerLimitKeys.all)
    }

    private static func readInternal(_ object: ObjectReader) -> InternalConfiguration {
        var configuration = InternalConfiguration()
        configuration.listen = readListen(object, default: configuration.listen)
        configuration.adminToken = object.optionalSecret("adminToken")
        if let names = object.stringArray("allowedHosts") {
            for (index, name) in names.enumerated() where !InternalConfiguration.isHostName(name) {
                object.reader.report("\(object.path("allowedHosts"))[\(index)]", "must be a host name without scheme or port, like console.example.internal")
            }
            configuration.allowedHosts = Set(names.map { $0.hasSuffix(".") ? String($0.lowercased().dropLast()) : $0.lowercased() })
        }
        configuration.limits = readLimits(object, default: configuration.limits)
        return configuration
    }

    private static func readMetrics(_ object: ObjectReader) -> MetricsConfiguration {
        var configuration = MetricsConfiguration()
        if object.has("listen") {
            configuration.listen = readListen(object, default: .tcp(host: "0.0.0.0", port: 9464))
        } else if !object.members.isEmpty {
            object.reader.report(object.path("listen"), "is required when metrics is given")
        }
        configuration.limits = readLimits(object, default: configuration.limits)
        return configuration
    }

    private enum ListenerLimitKeys {
        static let all: Set<String> = [
            "maxBodyBytes", "maxHeaderBytes", "readTimeoutSeconds", "idleTimeoutSeconds", "maxConnections",
        ]
    }

    private static func readLimits(_ object: ObjectReader, default limits: ListenerLimits) -> ListenerLimits {
        var limits = limits
        limits.maxBodyBytes = object.int("maxBodyBytes", default: limits.maxBodyBytes, in: 1...1_073_741_824)
        limits.maxHeaderBytes = object.int("maxHeaderBytes", default: limits.maxHeaderBytes, in: 1024...1_048_576)
        limits.readTimeoutSeconds = object.int("readTimeoutSeconds", default: limits.readTimeoutSeconds, in: 1...3600)
        limits.idleTimeoutSeconds = object.int("idleTimeoutSeconds", default: limits.idleTimeoutSeconds, in: 1...3600)
        limits.maxConnections = object.int("maxConnections", default: limits.maxConnections, in: 1...1_000_000)
        return limits
    }

    private static func readListen(_ parent: ObjectReader, default address: ListenAddress) -> ListenAddress {
        guard parent.has("listen") else { return address }
        let object = parent.object("listen", keys: ["host", "port", "unixSocket"])
        if let socket = object.optionalString("unixSocket") {
            if object.has("host") || object.has("port") {
                object.reader.report(object.path, "give either unixSocket or host and port, not both")
            }
            checkSocketPath(socket, at: object.path("unixSocket"), object.reader)
            return .unixSocket(path: socket)
        }
        guard case .tcp(let defaultHost, let defaultPort) = address else { return address }
        let host = object.string("host", default: defaultHost)
        if host.isEmpty { object.reader.report(object.path("host"), "must not be empty") }
        return .tcp(host: host, port: object.int("port", default: defaultPort, in: 0...65535))
    }

    private static func checkSocketPath(_ path: String, at jsonPath: String, _ reader: ConfigurationReader) {
        if path.isEmpty {
            reader.report(jsonPath, "must not be empty")
        } else if path.utf8.count > 107 {
            reader.report(jsonPath, "is \(path.utf8.count) bytes long; Unix socket paths must be at most 107 bytes")
        }
    }

    private static func readService(_ object: ObjectReader) -> ServiceConfiguration? {
        let name = object.requiredString("name") ?? ""
        if object.has("name"), !ServiceConfiguration.isValidName(name) {
            object.reader.report(object.path("name"), "must be 1 to 64 letters, digits, '-', '_' or '.'")
        }
        var service = ServiceConfiguration(name: name, token: object.optionalSecret("token"))
        service.share = object.int("share", default: 1, in: 1...1000)
        service.allow = object.array("allow") { value, path in
            guard case .string(let pattern) = value, AllowPattern(pattern) != nil else {
                object.reader.report(path, "must be \"METHOD /path\", with * matching one path segment or ending the path")
                return nil
            }
            return pattern
        }
        if object.has("deliver") {
            service.deliver = readDeliver(
                object.object(
                    "deliver",
                    keys: [
                        "url", "unixSocket", "path", "format", "signingSecret", "previousSigningSecret", "headers", "events",
                        "onlyOwnVerifications", "timeoutSeconds", "breaker", "maxPerSecond", "redact",
                    ]))
        }
        return service
    }

    private static func readDeliver(_ object: ObjectReader) -> DeliverConfiguration? {
        let reader = object.reader
        let target: DeliveryTarget
        switch (object.optionalString("url"), object.optionalString("unixSocket")) {
        case (let url?, nil):
            if let problem = HTTPURL.problem(url) { reader.report(object.path("url"), problem) }
            if object.has("path") { reader.report(object.path("path"), "goes with unixSocket only; put the path in the url") }
            target = .url(url)
        case (nil, let socket?):
            checkSocketPath(socket, at: object.path("unixSocket"), reader)
            let path = object.string("path", default: "/")
            if !path.hasPrefix("/") {
                reader.report(object.path("path"), "must start with /")
            } else if !HTTPURL.isRequestTarget(path) {
                reader.report(object.path("path"), "must be percent-encoded where it holds a space, a #, a non-ASCII or another character a request line cannot carry")
            }
            target = .unixSocket(socketPath: socket, path: path)
        case (.some, .some):
            reader.report(object.path, "give either url or unixSocket, not both")
            return nil
        case (nil, nil):
            reader.report(object.path, "needs a url or a unixSocket")
            return nil
        }
        var deliver = DeliverConfiguration(target: target)
        deliver.format = object.enumeration("format", default: .normalized)
        deliver.signingSecret = object.optionalSecret("signingSecret")
        deliver.previousSigningSecret = object.optionalSecret("previousSigningSecret")
        for (key, secret) in [("signingSecret", deliver.signingSecret), ("previousSigningSecret", deliver.previousSigningSecret)] {
            if let secret, secret.isResolved, StandardWebhooks.key(from: secret) == nil {
                reader.report(object.path(key), "must be a Standard Webhooks secret: whsec_ followed by base64 (at least 16 bytes)")
            }
        }
        if deliver.previousSigningSecret != nil, deliver.signingSecret == nil {
            reader.report(object.path("previousSigningSecret"), "goes with signingSecret, the secret that replaces it")
        }
        let headers = object.object("headers", keys: nil)
        for member in headers.members {
            let path = "\(headers.path).\(member.key)"
            if !isHeaderName(member.key) {
                reader.report(path, "is not a valid header name")
            } else if DeliverConfiguration.reservedHeaders.contains(member.key.lowercased()) {
                reader.report(path, "is set by the sidecar and cannot be configured")
            } else if let value = reader.secret(member.value, at: path) {
                // A line break would end the header and start another, or a second request.
                if value.value.utf8.contains(where: { ($0 < 0x20 && $0 != 0x09) || $0 == 0x7F }) {
                    reader.report(path, "must not hold a line break or another control character")
                }
                deliver.headers.append((member.key, value))
            }
        }
        if let events = object.stringArray("events") {
            if events.isEmpty { reader.report(object.path("events"), "must name at least one event pattern") }
            for (index, pattern) in events.enumerated() {
                if let problem = EventFilter.problem(with: pattern) { reader.report("\(object.path("events"))[\(index)]", problem) }
            }
            deliver.events = EventFilter(events)
        }
        deliver.onlyOwnVerifications = object.bool("onlyOwnVerifications", default: false)
        deliver.timeoutSeconds = object.int("timeoutSeconds", default: deliver.timeoutSeconds, in: 1...600)
        deliver.breakerFailures = object.object("breaker", keys: ["failures"]).int("failures", default: deliver.breakerFailures, in: 1...1000)
        if object.has("maxPerSecond") { deliver.maxPerSecond = object.int("maxPerSecond", default: 1, in: 1...100_000) }
        if let paths = object.array("redact", { value, path -> RedactionPath? in
            guard case .string(let text) = value, let redaction = RedactionPath(text) else {
                reader.report(path, "must be a path in the normalised body, such as \"data.metadata\" or \"data.scores.*\"")
                return nil
            }
            return redaction
        }) {
            deliver.redact = paths
            if deliver.format == .original, !paths.isEmpty {
                reader.report(object.path("redact"), "cannot be used with format original: that body is Kora's exact bytes, signed by Kora")
            }
        }
        return deliver
    }

    private static func readDelivery(_ object: ObjectReader) -> DeliveryConfiguration {
        var delivery = DeliveryConfiguration()
        delivery.mode = object.enumeration("mode", default: .queued)
        delivery.ordering = object.enumeration("ordering", default: .verification)
        if let schedule = object.array("retrySchedule", { value, path -> Duration? in
            // Bounded so that the time of the next attempt stays a date (and its arithmetic cannot trap).
            guard case .string(let text) = value, let duration = DurationText.parse(text), duration <= .seconds(30 * 86_400) else {
                object.reader.report(path, "must be a duration up to 30d, such as \"250ms\", \"5s\", \"2m\" or \"1h\"")
                return nil
            }
            return duration
        }) {
            delivery.retrySchedule = schedule
        }
        delivery.concurrency = object.int("concurrency", default: delivery.concurrency, in: 1...1024)
        delivery.drainTimeout = object.duration("drainTimeout", default: delivery.drainTimeout, upTo: .seconds(3600), describedAs: "1h")
        delivery.caFile = object.optionalString("caFile")
        return delivery
    }

    private static func validate(_ configuration: SidecarConfiguration, root: ObjectReader, _ reader: ConfigurationReader) {
        var names = Set<String>()
        for (index, service) in configuration.services.enumerated() where !service.name.isEmpty {
            if !names.insert(service.name).inserted {
                reader.report("$.services[\(index)].name", "\"\(service.name)\" is used by another service")
            }
        }
        let anonymous = configuration.services.indices.filter { configuration.services[$0].token == nil }
        if anonymous.count > 1, !hasTokenProblem(reader) {
            for index in anonymous.dropFirst() {
                reader.report(
                    "$.services[\(index)].token",
                    "is required: at most one service may omit its token (services[\(anonymous[0])] already does)")
            }
        }
        // One token for two callers would make each the other: in the proxy, in routing, in /admin.
        var holders: [String: Int] = [:]
        for (index, service) in configuration.services.enumerated() {
            guard let token = service.token?.value, !token.isEmpty else { continue }
            if let first = holders[token] {
                reader.report("$.services[\(index)].token", "is the token of services[\(first)]: each service needs its own")
            } else {
                holders[token] = index
            }
        }
        // With one service, it is the only caller there is: the admin token may be its own.
        if configuration.services.count > 1, let admin = configuration.internal.adminToken?.value, let index = holders[admin] {
            reader.report("$.internal.adminToken", "is the token of services[\(index)]: that service could read, replay and erase every event")
        }
        var listeners = [("webhooks", configuration.webhooks.listen), ("internal", configuration.internal.listen)]
        if let metrics = configuration.metrics.listen { listeners.append(("metrics", metrics)) }
        for (index, (name, address)) in listeners.enumerated() {
            guard let (other, _) = listeners[..<index].first(where: { $0.1.collides(with: address) }) else { continue }
            switch address {
            case .tcp: reader.report("$.\(name).listen.port", "must differ from \(other).listen.port")
            case .unixSocket: reader.report("$.\(name).listen.unixSocket", "must differ from \(other).listen.unixSocket")
            }
        }
    }

    private static func hasTokenProblem(_ reader: ConfigurationReader) -> Bool {
        reader.problems.contains { $0.path.hasSuffix(".token") }
    }

    static func isHeaderName(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.allSatisfy { byte in
            (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A)
                || "!#$%&'*+-.^_`|~".utf8.contains(byte)
        }
    }
}

extension ServiceConfiguration {
    /// Whether `name` is usable as a service name (it appears in logs, metrics labels and the store).
    static func isValidName(_ name: String) -> Bool {
        (1...64).contains(name.utf8.count)
            && name.utf8.allSatisfy { byte in
                (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A)
                    || byte == UInt8(ascii: "-") || byte == UInt8(ascii: "_") || byte == UInt8(ascii: ".")
            }
    }
}

extension ListenAddress {
    /// Whether two listeners would bind the same port or socket (port 0 picks a free one each).
    fileprivate func collides(with other: ListenAddress) -> Bool {
        switch (self, other) {
        case (.tcp(_, let a), .tcp(_, let b)): a == b && a != 0
        case (.unixSocket(let a), .unixSocket(let b)): a == b
        default: false
        }
    }
}

extension LoggingConfiguration {
    /// The level names swift-log knows.
    static let levels = ["trace", "debug", "info", "notice", "warning", "error", "critical"]
}
