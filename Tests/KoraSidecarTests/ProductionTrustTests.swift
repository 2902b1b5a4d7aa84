import Foundation
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

/// What a team deploying the sidecar relies on: no accepted event dropped silently, rollouts that
/// can be watched, credentials that cannot be guessed into, commands that work where `serve` runs.
@Suite("Production trust")
struct ProductionTrustTests {
    // MARK: Events no service takes

    @Test func aProxyOnlySidecarRunsKeepsEventsAsUnroutedAndRoutesThemOnceAServiceIsAdded() async throws {
        let directory = try temporaryDirectory()
        let proxyOnly = try writeProcessConfig(directory: directory, receiverPort: 0, services: #"[{"name": "app"}]"#)

        let check = try await Binary.run(["check-config", "--config", proxyOnly])
        #expect(check.status == 0)
        #expect(check.stderr.contains("warning: No service receives events"))
        #expect(!check.stderr.contains("No service is configured"))

        let first = try SidecarProcess(config: proxyOnly)
        let sidecar = try await first.running()
        let body = TestEvent.body(eventID: "evt_unrouted_\(TestSecrets.unique)")
        let answer = try await sendSigned(body, to: sidecar)
        #expect(answer.status == 200)
        #expect(try await sendSigned(body, to: sidecar).json?["duplicate"] == true)
        #expect(first.log.contains { $0.contains("No service receives events") })
        try await waitUntil("the unrouted event's log line") { first.log.contains { $0.contains("Webhook matched no service; kept as unrouted") && $0.contains("evt_unrouted_") } }
        let metrics = try await get(sidecar.internalURL("/metrics")).body
        #expect(metrics.contains(#"kora_sidecar_webhooks_total{result="unrouted"} 1"#))
        #expect(metrics.contains("kora_sidecar_unrouted_events 1"))
        let listed = try await get(sidecar.internalURL("/admin/deliveries?status=unrouted")).json
        #expect(listed?["deliveries"]?[0]?["eventId"]?.text == "evt_unrouted_\(TestSecrets.unique)")
        let command = try await Binary.run(["deliveries", "list", "--status", "unrouted", "--config", proxyOnly])
        #expect(command.status == 0)
        #expect(command.stdout.contains("evt_unrouted_\(TestSecrets.unique)"))
        first.signal(SIGTERM)
        try await first.expectCleanExit()
        #expect(first.log.contains { $0.contains(#""message":"Stopped""#) })

        // The operator adds the service, routes the kept event, and the restarted sidecar delivers it.
        let receiver = Receiver()
        try await withReceiver(receiver) { port in
            let withService = try writeProcessConfig(directory: directory, receiverPort: port)
            let routed = try await Binary.run(["deliveries", "retry", "--unrouted", "--config", withService])
            #expect(routed.status == 0)
            #expect(routed.stdout.contains("1 unrouted events were routed (1 deliveries queued); 0 still match no service."))
            let second = try SidecarProcess(config: withService)
            _ = try await second.running()
            let delivered = try await receiver.waitFor(1, timeout: .seconds(20))
            #expect(delivered[0].header("webhook-id") == "evt_unrouted_\(TestSecrets.unique)")
            try await waitUntil("the delivery to be logged") { second.log.contains { $0.contains(#""message":"Delivered""#) } }
            let left = try await Binary.run(["deliveries", "list", "--status", "unrouted", "--config", withService])
            #expect(left.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "[]")
            second.signal(SIGTERM)
            try await second.expectCleanExit()
        }
    }

    @Test func directModeKeepsWhatNoServiceTakesAndRoutesItAgainOnRequest() async throws {
        let receiver = Receiver()
        try await withReceiver(receiver) { port in
            let fraudOnly = testService("fraud", target: .url("http://127.0.0.1:\(port)/events"), events: ["fraud_alert.*"])
            var options = SidecarOptions()
            options.store = InMemoryStore()
            try await withSidecar(testConfiguration(services: [fraudOnly], mode: .direct), options: options) { sidecar in
                let completed = TestEvent.body(type: "verification.completed")
                #expect(try await sendSigned(completed, to: sidecar).status == 200)
                #expect(try await sendSigned(completed, to: sidecar).json?["duplicate"] == true)
                #expect(try await sendSigned(TestEvent.body(type: "fraud_alert.created"), to: sidecar).status == 200)
                #expect(receiver.count == 1)
                let listed = try await get(sidecar.internalURL("/admin/deliveries?status=unrouted")).json?["deliveries"]
                #expect(listed?[0]?["eventType"]?.text == "verification.completed")
                #expect(listed?[1] == nil)
                let retried = try await post(sidecar.internalURL("/admin/deliveries/retry?status=unrouted"), body: [], headers: [])
                #expect(retried.json?["stillUnrouted"]?.text == "1")
                #expect(retried.json?["routedEvents"]?.text == "0")
                let refused = try await post(sidecar.internalURL("/admin/deliveries/retry?status=everything"), body: [], headers: [])
                #expect(refused.status == 400)
                #expect(refused.code == "INVALID_STATUS")
            }
        }
    }

    @Test func directModeWithOnlyOwnVerificationsWarnsThatTheStoreMustOutliveThePod() async throws {
        for onlyOwn in [true, false] {
            var service = testService("app", target: .url("http://127.0.0.1:9/events"))
            service.deliver?.onlyOwnVerifications = onlyOwn
            var options = SidecarOptions()
            options.store = InMemoryStore()
            let logs = TestLogs()
            try await withSidecar(testConfiguration(services: [service], mode: .direct), options: options, logs: logs) { _ in }
            let warned = logs.all.contains { $0.hasPrefix("warning onlyOwnVerifications keeps which service created each verification in the store") }
            #expect(warned == onlyOwn)
        }
    }

    // MARK: Report-only rollouts

    @Test func reportOnlyWebhooksThatFailVerificationAreCountedApartWithTheReason() async throws {
        let receiver = Receiver()
        try await withReceiver(receiver) { port in
            var configuration = testConfiguration(services: [testService("app", target: .url("http://127.0.0.1:\(port)/events"))])
            configuration.webhooks.enforce = false
            var options = SidecarOptions()
            options.store = InMemoryStore()
            try await withSidecar(configuration, options: options) { sidecar in
                let body = TestEvent.body()
                #expect(try await sendSigned(TestEvent.body(), to: sidecar, secret: "whsec_someone_else").status == 200)
                #expect(try await sendSigned(body, to: sidecar).status == 200)
                _ = try await receiver.waitFor(2)
                // Kora's second copy of an event, failing verification: a duplicate, counted as unverified.
                #expect(try await sendSigned(body, to: sidecar, secret: "whsec_someone_else").json?["duplicate"] == .bool(true))
                let metrics = try await get(sidecar.internalURL("/metrics")).body
                #expect(metrics.contains(#"kora_sidecar_webhooks_total{result="unverified",reason="INVALID_SIGNATURE"} 2"#))
                #expect(metrics.contains(#"kora_sidecar_webhooks_total{result="accepted"} 1"#))
                #expect(!metrics.contains(#"kora_sidecar_webhooks_total{result="duplicate"}"#))
            }
        }
    }

    // MARK: Who is calling the proxy

    @Test func aTokenThatMatchesNoServiceIsRefusedWhereServicesHaveTokens() async throws {
        try await withSimulator { _, base in
            let services = [appService(name: "billing"), appService(name: "web", token: nil)]
            let logs = TestLogs()
            try await withProxySidecar(proxyConfiguration(koraBaseURL: base, services: services), logs: logs) { sidecar in
                let url = sidecar.internalURL("/api/v1/idv/document-types?country=US")
                let unknown = try await request(.GET, url, headers: [("Authorization", "Bearer sk_live_guessed")])
                #expect(unknown.status == 401)
                #expect(unknown.code == "UNAUTHORIZED")
                // Anyone who reaches the listener can repeat it: the log says so, not once per guess.
                for _ in 0..<30 { _ = try await request(.GET, url, headers: [("Authorization", "Bearer sk_live_guessed")]) }
                let said = logs.all.filter { $0.contains("no configured service has this token") }
                #expect(!said.isEmpty && said.count < 16, "\(said.count)")
                #expect(try await request(.GET, url, headers: [("Authorization", "Basic YTpi")]).status == 401)
                #expect(try await request(.GET, url).status == 200)
                #expect(try await request(.GET, url, headers: [("Authorization", "Bearer \(ProxySecrets.appToken)")]).status == 200)
            }
        }
    }

    @Test func whereNoServiceHasATokenAnyBearerIsTheAnonymousService() async throws {
        try await withSimulator { _, base in
            let services = [appService(name: "app", token: nil)]
            try await withProxySidecar(proxyConfiguration(koraBaseURL: base, services: services)) { (sidecar: ProxySidecar) async throws in
                let sdk = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: "sk_sandbox_whatever_the_sdk_wants")
                #expect(try await sdk.call(.GET, "/document-types?country=US").status == 200)
                #expect(try await request(.GET, sidecar.internalURL("/api/v1/idv/document-types?country=US")).status == 200)
            }
        }
    }

    // MARK: Metrics for Prometheus without the proxy

    @Test func theMetricsListenerServesMetricsAndHealthOnly() async throws {
        let directory = try temporaryDirectory()
        let config = try writeProcessConfig(directory: directory, receiverPort: 1, extra: #"}, "metrics": {"listen": {"host": "127.0.0.1", "port": 0}"#)
        let process = try SidecarProcess(config: config)
        let ports = try await process.listenerPorts(["webhooks", "internal", "metrics"])
        let base = "http://127.0.0.1:\(ports["metrics"]!)"
        try await waitUntil("the sidecar to be ready") { try await get(base + "/readyz").status == 200 }
        let metrics = try await get(base + "/metrics")
        #expect(metrics.status == 200)
        #expect(metrics.body.contains("kora_sidecar_ready 1"))
        // The SQLite store's disk, in bytes: something, and less than an exabyte.
        let free = metrics.body.split(separator: "\n").first { $0.hasPrefix("kora_sidecar_store_free_bytes ") }
        #expect(free.flatMap { Double($0.split(separator: " ")[1]) }.map { $0 > 0 && $0 < 1e18 } == true)
        #expect(try await get(base + "/healthz").status == 200)
        for path in ["/api/v1/idv/health", "/admin/deliveries", "/webhooks/koraidv"] {
            #expect(try await get(base + path).status == 404, "\(path)")
        }
        process.signal(SIGTERM)
        try await process.expectCleanExit()
    }

    // MARK: Where serve runs, the other commands find the same store

    @Test func commandsWithoutFlagsReadTheStoreOfAnEnvironmentOnlyServe() async throws {
        let directory = try temporaryDirectory()
        let environment = [
            "KORAIDV_WEBHOOK_SECRET": TestSecrets.webhook, "KORA_SIDECAR_WEBHOOK_PORT": "0", "KORA_SIDECAR_INTERNAL_PORT": "0",
            "KORA_SIDECAR_SQLITE_PATH": directory + "/kora-sidecar.sqlite",
        ]
        let process = try SidecarProcess(config: nil, environment: environment, directory: directory)
        let sidecar = try await process.running()
        #expect(try await sendSigned(TestEvent.body(eventID: "evt_container_\(TestSecrets.unique)"), to: sidecar).status == 200)
        let listed = try await Binary.run(["deliveries", "list", "--status", "unrouted"], environment: environment, directory: directory)
        #expect(listed.status == 0, "\(listed.stderr)")
        #expect(listed.stdout.contains("evt_container_\(TestSecrets.unique)"))
        process.signal(SIGTERM)
        try await process.expectCleanExit()

        // A command pointed at a store that does not exist says so, and creates nothing.
        let missing = directory + "/elsewhere/kora-sidecar.sqlite"
        var wrong = environment
        wrong["KORA_SIDECAR_SQLITE_PATH"] = missing
        let refused = try await Binary.run(["deliveries", "list"], environment: wrong, directory: directory)
        #expect(refused.status == 1)
        #expect(refused.stderr.contains("The store \(missing) (storage.sqlitePath) does not exist"))
        #expect(!FileManager.default.fileExists(atPath: missing))
    }

    @Test func theConfigurationIsFoundInTheSystemPathAfterTheWorkingDirectory() throws {
        let directory = try temporaryDirectory()
        let system = directory + "/config.json"
        #expect(ConfigurationSource.resolve(flag: nil, environment: [:], systemPath: directory + "/absent.json") == .environment)
        try "{}".write(toFile: system, atomically: true, encoding: .utf8)
        #expect(ConfigurationSource.resolve(flag: nil, environment: [:], systemPath: system) == .file(system))
        #expect(ConfigurationSource.resolve(flag: nil, environment: ["KORA_SIDECAR_CONFIG": "/x.json"], systemPath: system) == .file("/x.json"))
        #expect(ConfigurationSource.resolve(flag: "/y.json", environment: [:], systemPath: system) == .file("/y.json"))
    }

    @Test func readOnlyCommandsAcceptEveryConfigurationServeAccepts() async throws {
        let directory = try temporaryDirectory()
        let services = #"[{"name": "app", "deliver": {"url": "http://127.0.0.1:1/events", "signingSecret": {"env": "APP_SIGNING_SECRET"}}}]"#
        let config = try writeProcessConfig(directory: directory, receiverPort: 0, services: services)
        try SQLiteStore(path: directory + "/store.sqlite", protection: .sealedForTests).close()
        // serve would read APP_SIGNING_SECRET; listing deliveries must not need it.
        let listed = try await Binary.run(["deliveries", "list", "--config", config])
        #expect(listed.status == 0, "\(listed.stderr)")
        #expect(listed.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "[]")
    }

    // MARK: The environment-only start of a one-app container

    @Test func anEnvironmentOnlyStartCoversAOneAppContainer() throws {
        let environment = [
            "KORAIDV_WEBHOOK_SECRET": TestSecrets.webhook, "KORA_SIDECAR_INTERNAL_SOCKET": "/run/kora-sidecar/api.sock",
            "KORA_SIDECAR_SERVICE_TOKEN": "app-token", "KORA_SIDECAR_ADMIN_TOKEN": "admin-token",
            "KORA_SIDECAR_EVENTS": "verification.*, fraud_alert.created", "KORA_SIDECAR_DELIVERY_FORMAT": "original",
            "KORA_SIDECAR_FORWARD_URL": "http://127.0.0.1:3000/kora-events", "KORA_SIDECAR_METRICS_PORT": "9464",
        ]
        let configuration = try ConfigurationSource.environment.load(environment: environment)
        #expect(configuration.internal.listen == .unixSocket(path: "/run/kora-sidecar/api.sock"))
        #expect(configuration.internal.adminToken?.value == "admin-token")
        #expect(configuration.services[0].token?.value == "app-token")
        #expect(configuration.services[0].deliver?.format == .original)
        #expect(configuration.services[0].deliver?.events.matches("verification.verified") == true)
        #expect(configuration.services[0].deliver?.events.matches("fraud_alert.created") == true)
        #expect(configuration.services[0].deliver?.events.matches("fraud_alert.resolved") == false)
        #expect(configuration.metrics.listen == .tcp(host: "0.0.0.0", port: 9464))

        let host = try ConfigurationSource.environment.load(
            environment: ["KORAIDV_WEBHOOK_SECRET": TestSecrets.webhook, "KORA_SIDECAR_INTERNAL_HOST": "0.0.0.0"])
        #expect(host.internal.listen == .tcp(host: "0.0.0.0", port: 8081))
    }

    @Test func environmentOnlyErrorsNameTheVariable() throws {
        let environment = [
            "KORA_SIDECAR_WEBHOOK_PORT": "eighty", "KORA_SIDECAR_DELIVERY_FORMAT": "xml", "KORA_SIDECAR_EVENTS": ",",
            "KORA_SIDECAR_FORWARD_URL": "ftp://app/events",
        ]
        let error = try #require(throws: ConfigurationError.self) { try ConfigurationSource.environment.load(environment: environment) }
        let text = error.description
        for variable in [
            "KORAIDV_WEBHOOK_SECRET: is not set", "KORA_SIDECAR_WEBHOOK_PORT:", "KORA_SIDECAR_DELIVERY_FORMAT:",
            "KORA_SIDECAR_EVENTS:", "KORA_SIDECAR_FORWARD_URL:",
        ] {
            #expect(text.contains(variable), "\(variable) in \(text)")
        }
        #expect(!text.contains("$."), "\(text)")

        let neither = try #require(throws: ConfigurationError.self) {
            try ConfigurationSource.environment.load(environment: ["KORAIDV_WEBHOOK_SECRET": "whsec_x", "KORA_SIDECAR_DELIVERY_FORMAT": "original"])
        }
        #expect(neither.description.contains("KORA_SIDECAR_FORWARD_URL or KORA_SIDECAR_FORWARD_SOCKET: needs a url or a unixSocket"))
    }

    // MARK: The go-live check

    @Test func checkKoraSaysWhetherKoraAcceptsTheKeyAndTenant() async throws {
        let directory = try temporaryDirectory()
        try await withSimulator({
            $0.apiKeys = [ProxySecrets.apiKey]
            $0.tenantID = ProxySecrets.tenant
        }) { _, base in
            func check(key: String, tenant: String, base: String) async throws -> (status: Int32, stdout: String, stderr: String) {
                let path = directory + "/kora-\(UInt32.random(in: 0...UInt32.max)).json"
                let text = """
                    {"kora": {"apiBaseURL": "\(base)", "apiKey": "\(key)", "tenantId": "\(tenant)", "timeoutSeconds": 5},
                     "webhooks": {"secrets": ["\(TestSecrets.webhook)"]}, "storage": {"sqlitePath": "\(directory)/store.sqlite"}}
                    """
                try text.write(toFile: path, atomically: true, encoding: .utf8)
                return try await Binary.run(["check-kora", "--config", path])
            }
            let good = try await check(key: ProxySecrets.apiKey, tenant: ProxySecrets.tenant, base: base)
            #expect(good.status == 0, "\(good.stdout)\(good.stderr)")
            #expect(good.stdout.contains("reachable: yes (200 from \(base)/health)"))
            #expect(good.stdout.contains("key: accepted\ntenant: accepted\nround trip: "))

            let badKey = try await check(key: "sk_sandbox_wrong", tenant: ProxySecrets.tenant, base: base)
            #expect(badKey.status == 1)
            #expect(badKey.stdout.contains("key: refused (401)"))

            let badTenant = try await check(key: ProxySecrets.apiKey, tenant: "tenant-other", base: base)
            #expect(badTenant.status == 1)
            #expect(badTenant.stdout.contains("key: accepted\ntenant: refused (403)"))

            let nowhere = try await check(key: ProxySecrets.apiKey, tenant: ProxySecrets.tenant, base: "http://127.0.0.1:\(try refusingPort())/api/v1/idv")
            #expect(nowhere.status == 1)
            #expect(nowhere.stdout.contains("reachable: no (connection refused"))

            for output in [good, badKey, badTenant, nowhere] {
                #expect(!(output.stdout + output.stderr).contains(ProxySecrets.apiKey))
            }
        }
    }

    // MARK: What a new user tripped over

    @Test func sendTestEventExitsOneWhenTheSidecarRefusesTheEvent() async throws {
        var options = SidecarOptions()
        options.store = InMemoryStore()
        try await withSidecar(testConfiguration(), options: options) { sidecar in
            let refused = try await Binary.run(["send-test-event", "--to", sidecar.webhookURL, "--secret", "whsec_not_the_one"])
            #expect(refused.status == 1)
            #expect(refused.stdout.hasPrefix("401 "))
            let taken = try await Binary.run(["send-test-event", "--to", sidecar.webhookURL, "--secret", TestSecrets.webhook])
            #expect(taken.status == 0, "\(taken.stdout)\(taken.stderr)")
            #expect(taken.stdout.hasPrefix("200 "))
        }
    }

    @Test func uploadsThatExpectContinueStartAtOnce() async throws {
        let logs = TestLogs()
        var configuration = testConfiguration()
        configuration.webhooks.limits.maxBodyBytes = 1000
        // Far past the client's wait: a connection left waiting for a body must not end by this deadline.
        configuration.internal.limits.readTimeoutSeconds = 300
        var options = SidecarOptions()
        options.store = InMemoryStore()
        try await withSidecar(configuration, options: options, logs: logs) { sidecar in
            let body = TestEvent.body()
            let signed = try RawConnection(port: sidecar.webhookPort)
            signed.send(
                "POST /webhooks/koraidv HTTP/1.1\r\nHost: x\r\nContent-Length: \(body.count)\r\nExpect: 100-continue\r\n"
                    + KoraSignature.headers(scheme: .timestamped, secret: Secret(TestSecrets.webhook), body: body, timestamp: UnixTime.now().seconds)
                    .map { "\($0.name): \($0.value)\r\n" }.joined() + "\r\n")
            // Nothing of the body has been sent: only the interim answer can arrive.
            #expect(await signed.head() == "HTTP/1.1 100 Continue\r\n\r\n")
            signed.send(body)
            #expect(statusCode(of: await signed.response()) == 200)

            // Refused before its body is read: the refusal comes without a 100, so no upload starts,
            // and the connection ends with it (the body it announced will never come).
            let unsigned = try RawConnection(port: sidecar.webhookPort)
            unsigned.send("POST /webhooks/koraidv HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
            #expect(statusCode(of: await unsigned.head()) == 401)
            let anonymous = try RawConnection(port: try #require(sidecar.internalPort))
            anonymous.send("POST /api/v1/idv/verifications HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
            let refusal = await anonymous.response()
            #expect(statusCode(of: refusal) == 401)
            #expect(refusal.lowercased().contains("connection: close"))
            #expect(await anonymous.closedByPeer())

            // A body larger than the listener takes gets its 413 at once, without a 100 first.
            let tooLarge = try RawConnection(port: sidecar.webhookPort)
            tooLarge.send("POST /webhooks/koraidv HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
            #expect(statusCode(of: await tooLarge.head()) == 413)
            #expect(logs.all.contains { $0.contains("Request body refused") && $0.contains("http.status=413") })
        }
    }

    @Test func aStoreThatCannotBeOpenedIsOneSentence() async throws {
        let directory = try temporaryDirectory()
        try "not a folder".write(toFile: directory + "/file", atomically: true, encoding: .utf8)
        let written = try writeProcessConfig(directory: directory, receiverPort: 1)
        let config = directory + "/unopenable.json"
        try String(contentsOfFile: written, encoding: .utf8).replacingOccurrences(of: "/store.sqlite", with: "/file/store.sqlite")
            .write(toFile: config, atomically: true, encoding: .utf8)
        let result = try await Binary.run(["serve", "--config", config])
        #expect(result.status == 1)
        #expect(result.stderr.contains("The store \(directory)/file/store.sqlite (storage.sqlitePath) cannot be opened"))
        #expect(!result.stderr.contains("Domain"))
        #expect(result.stderr.split(separator: "\n").count == 1, "\(result.stderr)")
    }

    @Test func outOfFileDescriptorsTheSidecarSaysSoAndDoesNotPauseTheService() async throws {
        // The sidecar that cannot open a connection to a service that is up says why, and the
        // failure is its own: two of them would pause the service (breaker failures: 2).
        let receiver = Receiver()
        try await withReceiver(receiver) { port in
            let services =
                #"[{"name": "app", "deliver": {"url": "http://127.0.0.1:\#(port)/events", "signingSecret": "\#(TestSecrets.signing)", "breaker": {"failures": 2}}}]"#
            let config = try writeProcessConfig(directory: try temporaryDirectory(), receiverPort: port, services: services, mode: .direct)
            let sidecar = try SidecarProcess(config: config)
            let running = try await sidecar.running()
            // Connections the sidecar has accepted (it answered on them) stay usable under any limit.
            let webhooks = try RawConnection(port: running.webhookPort, readTimeout: 30)
            let admin = try RawConnection(port: try #require(running.internalPort), readTimeout: 30)
            for connection in [webhooks, admin] {
                connection.send("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                #expect(statusCode(of: await connection.response()) == 200)
            }
            let hard = try #require(sidecar.openFileLimits?.hard)
            // A soft limit of 0: no new file descriptor at all.
            #expect(try await runTool("/usr/bin/prlimit", ["--pid", "\(sidecar.pid)", "--nofile=0:\(hard)"]).status == 0)
            for _ in 0..<3 {
                webhooks.send(signedWebhookRequest(TestEvent.body()))
                let answer = await webhooks.response()
                #expect(statusCode(of: answer) == 503)
                #expect(answer.contains("did not accept"), "\(answer)")
            }
            admin.send("GET /admin/services HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            let listing = await admin.response()
            #expect(listing.contains(#""consecutiveFailures":0"#), "\(listing)")
            #expect(listing.contains(#""state":"closed""#), "\(listing)")
            #expect(sidecar.log.contains { $0.contains("the sidecar is out of file descriptors for a new connection (EMFILE)") }, "\(sidecar.log.suffix(5))")
            #expect(!sidecar.log.contains { $0.contains("connection refused") })

            #expect(try await runTool("/usr/bin/prlimit", ["--pid", "\(sidecar.pid)", "--nofile=\(hard):\(hard)"]).status == 0)
            webhooks.send(signedWebhookRequest(TestEvent.body()))
            #expect(statusCode(of: await webhooks.response()) == 200)
            #expect(receiver.count == 1)
            sidecar.signal(SIGTERM)
            try await sidecar.expectCleanExit()
        }
    }

    @Test func outOfFileDescriptorsAQueuedDeliveryKeepsItsRetriesAndGoesOnceItCan() async throws {
        // Queued, with a schedule of three retries 100–200 ms apart: attempts the sidecar could not
        // make would have spent them in half a second, and the delivery's attempt count with them.
        let receiver = Receiver()
        try await withReceiver(receiver) { port in
            let config = try writeProcessConfig(directory: try temporaryDirectory(), receiverPort: port)
            var sidecar = try SidecarProcess(config: config)
            let running = try await sidecar.running()
            let webhooks = try RawConnection(port: running.webhookPort, readTimeout: 30)
            webhooks.send("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            #expect(statusCode(of: await webhooks.response()) == 200)
            let hard = try #require(sidecar.openFileLimits?.hard)
            #expect(try await runTool("/usr/bin/prlimit", ["--pid", "\(sidecar.pid)", "--nofile=0:\(hard)"]).status == 0)
            let eventID = "evt_emfile_\(TestSecrets.unique)"
            // Stored on a connection already open and a store already open: accepted.
            webhooks.send(signedWebhookRequest(TestEvent.body(eventID: eventID)))
            #expect(statusCode(of: await webhooks.response()) == 200)
            let failed = sidecar
            try await waitUntil("the sidecar to meet EMFILE delivering") {
                failed.log.contains { $0.contains("the sidecar is out of file descriptors for a new connection (EMFILE)") }
            }
            let listed = try await Binary.run(["deliveries", "list", "--status", "pending", "--config", config])
            let delivery = try JSONParser.parse(Array(listed.stdout.utf8))[0]
            #expect(delivery?["eventId"]?.text == eventID, "\(listed.stdout)")
            #expect(delivery?["attempts"] == .int(0), "\(listed.stdout)")
            #expect(sidecar.log.contains { $0.contains("Delivery not attempted: the sidecar could not open a connection") })
            #expect(receiver.count == 0)

            // With descriptors again it goes, as its first attempt: here at the next start, which
            // ends every lease (in a running sidecar, once its lease ends).
            #expect(try await runTool("/usr/bin/prlimit", ["--pid", "\(sidecar.pid)", "--nofile=\(hard):\(hard)"]).status == 0)
            sidecar.signal(SIGTERM)
            try await sidecar.expectCleanExit()
            sidecar = try SidecarProcess(config: config)
            _ = try await sidecar.running()
            let delivered = try await receiver.waitFor(1)
            #expect(delivered[0].header("webhook-id") == eventID)
            #expect(delivered[0].header("X-Kora-Delivery-Attempt") == "1")
            sidecar.signal(SIGTERM)
            try await sidecar.expectCleanExit()
        }
    }

    @Test func deliveriesHelpSaysWhatEachCommandDoes() async throws {
        let help = try await Binary.run(["deliveries", "--help"])
        for phrase in ["List deliveries", "Show one delivery", "Queue one delivery again", "Send an already delivered"] {
            #expect(help.stdout.contains(phrase), "\(phrase)")
        }
    }
}

extension JSONValue {
    /// The element at `index` of an array, if there is one.
    fileprivate subscript(index: Int) -> JSONValue? {
        guard case .array(let elements) = self, elements.indices.contains(index) else { return nil }
        return elements[index]
    }
}

/// A webhook request signed as Kora signs it, whole, for a raw connection.
private func signedWebhookRequest(_ body: [UInt8]) -> [UInt8] {
    let headers = KoraSignature.headers(scheme: .timestamped, secret: Secret(TestSecrets.webhook), body: body, timestamp: UnixTime.now().seconds)
    let head = "POST /webhooks/koraidv HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: \(body.count)\r\n"
        + headers.map { "\($0.name): \($0.value)\r\n" }.joined() + "\r\n"
    return Array(head.utf8) + body
}
