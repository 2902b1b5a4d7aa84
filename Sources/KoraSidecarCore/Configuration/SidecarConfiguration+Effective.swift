extension SidecarConfiguration {
    /// The effective configuration, every default filled in and every secret shown as `"***"`:
    /// what `check-config` prints.
    package var effectiveJSON: JSONValue {
        [
            "kora": [
                "apiBaseURL": .string(kora.apiBaseURL),
                "apiKey": masked(kora.apiKey),
                "tenantId": masked(kora.tenantId),
                "callbackURL": .optional(kora.callbackURL.map(HTTPURL.masked)),
                "timeoutSeconds": .int(kora.timeoutSeconds),
                "rateLimit": [
                    "perMinute": kora.rateLimit.perMinute.map(JSONValue.int) ?? .null,
                    "maxWait": .string(DurationText.format(kora.rateLimit.maxWait)),
                ],
                "retry": [
                    "maxAttempts": .int(kora.retry.maxAttempts),
                    "initialDelayMilliseconds": .int(kora.retry.initialDelayMilliseconds),
                    "maxDelayMilliseconds": .int(kora.retry.maxDelayMilliseconds),
                ],
            ],
            "webhooks": .object(
                [
                    .init("listen", listenJSON(webhooks.listen)),
                    .init(
                        "tls",
                        webhooks.tls.map {
                            ["certificateFile": .string($0.certificateFile), "privateKeyFile": .string($0.privateKeyFile)]
                        } ?? .null),
                    .init("path", .string(webhooks.path)),
                    .init("secrets", .array(webhooks.secrets.map { _ in "***" })),
                    .init("schemes", .array(webhooks.schemes.map { .string($0.rawValue) })),
                    .init("toleranceSeconds", .int(webhooks.toleranceSeconds)),
                    .init("enforce", .bool(webhooks.enforce)),
                    .init("dedupWindowHours", .int(webhooks.dedupWindowHours)),
                ] + limitsJSON(webhooks.limits)),
            "internal": .object(
                [
                    .init("listen", listenJSON(self.internal.listen)),
                    .init("adminToken", masked(self.internal.adminToken)),
                    .init("allowedHosts", .array(self.internal.allowedHosts.sorted().map { .string($0) })),
                ] + limitsJSON(self.internal.limits)),
            "metrics": metrics.listen.map { listen in .object([.init("listen", listenJSON(listen))] + limitsJSON(metrics.limits)) } ?? .null,
            "services": .array(services.map(serviceJSON)),
            "delivery": [
                "mode": .string(delivery.mode.rawValue),
                "ordering": .string(delivery.ordering.rawValue),
                "retrySchedule": .array(delivery.retrySchedule.map { .string(DurationText.format($0)) }),
                "concurrency": .int(delivery.concurrency),
                "drainTimeout": .string(DurationText.format(delivery.drainTimeout)),
                "caFile": .optional(delivery.caFile),
            ],
            "storage": .object(
                [storage.postgresURL == nil ? .init("sqlitePath", .string(storage.sqlitePath)) : .init("postgresURL", "***")] + [
                    .init(
                        "encryption",
                        storage.encryptionKeys.isEmpty
                            ? ["keyFile": .string(storage.keyFilePath)]
                            : ["keys": .array(storage.encryptionKeys.map { ["id": .string($0.id), "key": "***"] })]),
                    .init("payloadRetention", .string(DurationText.format(storage.payloadRetention))),
                    .init("deadRetention", .string(DurationText.format(storage.deadRetention))),
                ]),
            "logging": ["level": .string(logging.level), "format": .string(logging.format.rawValue)],
        ]
    }

    private func masked(_ secret: Secret?) -> JSONValue { secret == nil ? .null : "***" }

    private func listenJSON(_ address: ListenAddress) -> JSONValue {
        switch address {
        case .tcp(let host, let port): ["host": .string(host), "port": .int(port)]
        case .unixSocket(let path): ["unixSocket": .string(path)]
        }
    }

    private func limitsJSON(_ limits: ListenerLimits) -> [JSONMember] {
        [
            .init("maxBodyBytes", .int(limits.maxBodyBytes)),
            .init("maxHeaderBytes", .int(limits.maxHeaderBytes)),
            .init("readTimeoutSeconds", .int(limits.readTimeoutSeconds)),
            .init("idleTimeoutSeconds", .int(limits.idleTimeoutSeconds)),
            .init("maxConnections", .int(limits.maxConnections)),
        ]
    }

    private func serviceJSON(_ service: ServiceConfiguration) -> JSONValue {
        var members: [JSONMember] = [
            .init("name", .string(service.name)),
            .init("token", masked(service.token)),
            .init("allow", service.allow.map { .array($0.map(JSONValue.string)) } ?? .null),
            .init("share", .int(service.share)),
        ]
        if let deliver = service.deliver {
            var target: [JSONMember]
            switch deliver.target {
            case .url(let url): target = [.init("url", .string(url))]
            case .unixSocket(let socket, let path): target = [.init("unixSocket", .string(socket)), .init("path", .string(path))]
            }
            target += [
                .init("format", .string(deliver.format.rawValue)),
                .init("signingSecret", masked(deliver.signingSecret)),
                .init("previousSigningSecret", masked(deliver.previousSigningSecret)),
                .init("headers", .object(deliver.headers.map { .init($0.name, "***") })),
                .init("events", .array(deliver.events.patterns.map(JSONValue.string))),
                .init("onlyOwnVerifications", .bool(deliver.onlyOwnVerifications)),
                .init("timeoutSeconds", .int(deliver.timeoutSeconds)),
                .init("breaker", ["failures": .int(deliver.breakerFailures)]),
                .init("maxPerSecond", deliver.maxPerSecond.map(JSONValue.int) ?? .null),
                .init("redact", .array(deliver.redact.map { .string($0.description) })),
            ]
            members.append(.init("deliver", .object(target)))
        } else {
            members.append(.init("deliver", .null))
        }
        return .object(members)
    }
}
