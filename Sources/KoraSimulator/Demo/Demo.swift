import AsyncHTTPClient
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import KoraSidecar
import KoraSidecarCore
import Logging
import NIOCore
import ServiceLifecycle

/// What `kora-sidecar demo` runs and how patient it is.
package struct DemoOptions: Sendable {
    /// Stay up after the walk-through (until SIGINT or SIGTERM) and print commands to try.
    package var keepRunning = false
    /// How long the simulator takes to decide `test-slow-` (Kora's sandbox: 10 s; shorter keeps the demo quick).
    package var slowDelay: Duration = .seconds(2)
    /// How long a `test-expired-` verification stays approved in the demo.
    var expiryDelay: Duration = .seconds(1)
    /// The longest wait for any one hop before it counts as failed.
    var stepTimeout: Duration = .seconds(30)
    /// The sandbox outcomes to walk through, in order.
    package var outcomes: [SandboxOutcome] = SandboxOutcome.allCases
    /// End with two services sharing one Kora key's rate budget (``DemoBudget``).
    package var sharesBudget = true

    /// The defaults of `kora-sidecar demo`.
    package init() {}
}

/// Runs the sidecar, the Kora simulator and a receiving app in this process on free ports, walks
/// one verification per sandbox outcome through every hop, and reports each hop through `output`,
/// one line at a time. Returns whether every hop worked.
///
/// - Throws: ``StartupError`` when the three servers cannot be started.
package func runDemo(options: DemoOptions = .init(), logger: Logger, output: @escaping @Sendable (String) -> Void) async throws -> Bool {
    let directory = try DemoDirectory()
    defer { directory.remove() }
    let apiKey = "sk_sandbox_demo_" + RandomID.make()
    let serviceToken = "demo-app-token"
    let webhookSecret = Secret("whsec_demo_" + RandomID.make())
    let signingSecret = Secret("whsec_" + Data((0..<24).map { _ in UInt8.random(in: 0...255) }).base64EncodedString())

    var simulatorConfiguration = SimulatorConfiguration(webhookSecret: webhookSecret)
    simulatorConfiguration.port = 0
    simulatorConfiguration.apiKeys = [apiKey]
    simulatorConfiguration.slowDelay = options.slowDelay
    simulatorConfiguration.expiryDelay = options.expiryDelay
    simulatorConfiguration.webhookRetryDelays = [.milliseconds(200), .milliseconds(500)]
    // Kora's rate limit, per 2 s instead of a minute so that the budget step takes seconds.
    simulatorConfiguration.rateLimitPerMinute = DemoBudget.limit
    simulatorConfiguration.rateLimitWindowSeconds = DemoBudget.window
    let simulator = KoraSimulator(configuration: simulatorConfiguration)
    let receiver = DemoReceiver(signingSecret: signingSecret)
    let ports = ObservedLog<DemoPort>()

    let backends = ServiceGroup(
        services: [
            buildSimulator(simulator, logger: logger) { await ports.append(DemoPort(role: .simulator, address: $0)) },
            receiver.build(logger: logger) { await ports.append(DemoPort(role: .receiver, address: $0)) },
        ],
        gracefulShutdownSignals: options.keepRunning ? [.sigterm, .sigint] : [], logger: logger)
    let client = HTTPClient(eventLoopGroupProvider: .singleton)

    let result: Result<Bool, any Error> = await withTaskGroup(of: Void.self) { group in
        group.addTask { try? await backends.run() }
        var sidecar: ServiceGroup?
        do {
            let simulatorPort = try await DemoPort.wait(.simulator, in: ports)
            let receiverPort = try await DemoPort.wait(.receiver, in: ports)
            var configuration = SidecarConfiguration(webhooks: WebhookConfiguration(secrets: [webhookSecret]))
            configuration.webhooks.listen = .tcp(host: "127.0.0.1", port: 0)
            configuration.internal.listen = .tcp(host: "127.0.0.1", port: 0)
            configuration.kora.apiBaseURL = "http://127.0.0.1:\(simulatorPort)/api/v1/idv"
            configuration.kora.apiKey = Secret(apiKey)
            configuration.kora.tenantId = Secret("demo-tenant")
            var deliver = DeliverConfiguration(target: .url("http://127.0.0.1:\(receiverPort)/kora-events"))
            deliver.signingSecret = signingSecret
            configuration.services = [
                ServiceConfiguration(name: "demo-app", token: Secret(serviceToken), deliver: deliver),
                ServiceConfiguration(name: "batch-job", token: Secret(DemoBudget.batchToken)),
            ]
            configuration.storage.sqlitePath = directory.path + "/kora-sidecar.sqlite"
            var sidecarOptions = SidecarOptions()
            sidecarOptions.koraProxy.budgetWindow = DemoBudget.sidecarWindow
            sidecarOptions.onListening = { role, address in
                await ports.append(DemoPort(role: role == .webhooks ? .webhooks : .internal, address: address))
            }
            sidecarOptions.koraProxy.callbackURL = {
                await ports.all.first { $0.role == .webhooks }.map { "http://127.0.0.1:\($0.port)/webhooks/koraidv" }
            }
            let app = try buildApplication(configuration, logger: logger, options: sidecarOptions)
            let started = ServiceGroup(services: [app], logger: logger)
            sidecar = started
            group.addTask { try? await started.run() }
            let webhooksPort = try await DemoPort.wait(.webhooks, in: ports)
            let internalPort = try await DemoPort.wait(.internal, in: ports)
            let webhookURL = "http://127.0.0.1:\(webhooksPort)/webhooks/koraidv"
            simulator.setDashboardWebhookURL(webhookURL)

            let walk = DemoWalk(
                client: client, internalURL: "http://127.0.0.1:\(internalPort)", webhookURL: webhookURL, serviceToken: serviceToken,
                simulator: simulator, receiver: receiver, options: options, output: output)
            walk.introduce(simulatorPort: simulatorPort, receiverPort: receiverPort)
            var passed = 0
            for (index, outcome) in options.outcomes.enumerated() where await walk.run(outcome, explain: index == 0) { passed += 1 }
            let everyHop = await walk.checkNothingDeliveredTwice() && passed == options.outcomes.count
            let budget = options.sharesBudget
                ? await DemoBudget(internalURL: walk.internalURL, appToken: serviceToken, output: output).run() : true
            output("")
            let outcomes = "\(passed) of \(options.outcomes.count) sandbox outcomes went through every hop"
            let shared = options.sharesBudget ? (budget ? "; two services shared Kora's budget" : "; the shared budget failed") : ""
            output(everyHop && budget ? "✓ \(outcomes)\(shared)." : "✗ \(outcomes)\(shared); see the ✗ lines above.")
            if options.keepRunning {
                walk.printTryIt()
                _ = await group.next()  // the simulator's group ends on SIGINT or SIGTERM
            }
            await started.triggerGracefulShutdown()
            await backends.triggerGracefulShutdown()
            return .success(everyHop && budget)
        } catch {
            await sidecar?.triggerGracefulShutdown()
            await backends.triggerGracefulShutdown()
            return .failure(error)
        }
    }
    try? await client.shutdown()
    return try result.get()
}

/// A listener of the demo and its port.
struct DemoPort: Sendable {
    enum Role: String, Sendable {
        case simulator, receiver, webhooks, `internal`
    }

    var role: Role
    var port: Int

    init(role: Role, address: SocketAddress?) {
        self.role = role
        self.port = address?.port ?? 0
    }

    /// The port of `role` once it is bound.
    static func wait(_ role: Role, in ports: ObservedLog<DemoPort>) async throws -> Int {
        guard let found = await ports.first(timeout: .seconds(15), where: { $0.role == role }) else {
            throw StartupError("The demo's \(role.rawValue) listener did not start; run with a free loopback interface.")
        }
        return found.port
    }
}

/// A temporary directory for the demo's SQLite store, removed afterwards.
struct DemoDirectory {
    let path: String

    init() throws {
        var template = Array((FileManager.default.temporaryDirectory.path + "/kora-sidecar-demo-XXXXXX").utf8CString)
        guard let made = mkdtemp(&template) else { throw StartupError("The demo cannot create a temporary directory.") }
        path = String(cString: made)
    }

    func remove() { try? FileManager.default.removeItem(atPath: path) }
}

/// The walk-through: one verification per sandbox outcome, every hop checked and told.
struct DemoWalk: Sendable {
    let client: HTTPClient
    let internalURL: String
    let webhookURL: String
    let serviceToken: String
    let simulator: KoraSimulator
    let receiver: DemoReceiver
    let options: DemoOptions
    let output: @Sendable (String) -> Void

    func introduce(simulatorPort: Int, receiverPort: Int) {
        output("Kora sidecar demo: three programs, all in this process, on free ports.")
        output("  Kora (simulator)  http://127.0.0.1:\(simulatorPort)/api/v1/idv   stand-in for api.korastratum.com")
        output("  sidecar, public   \(webhookURL)   Kora sends webhooks here")
        output("  sidecar, internal \(internalURL)/api/v1/idv   your services call Kora through here")
        output("  your app          http://127.0.0.1:\(receiverPort)/kora-events   receives events, checks their signature")
        output("The app holds only its sidecar token; the sidecar adds Kora's API key and tenant id.")
        output("Kora sends every event to the verification's callbackUrl and to the dashboard URL: the second copy")
        output("must be acknowledged and not delivered twice.")
        if options.outcomes.contains(.slow) {
            output("Note: at Kora, test-slow- takes 10 s to decide; this demo's simulator decides after \(Self.text(options.slowDelay)).")
        }
    }

    /// The events Kora sends for `outcome`, in order: every decision is `verification.completed`,
    /// an automatic approval or rejection is then also `verification.verified` or `.rejected`.
    static func expectedEvents(_ outcome: SandboxOutcome) -> [String] {
        switch outcome {
        case .approve, .slow: ["verification.completed", "verification.verified"]
        case .review: ["verification.completed"]
        case .reject: ["verification.completed", "verification.rejected"]
        case .fraud: ["fraud_alert.created", "verification.completed", "verification.rejected"]
        case .expired: ["verification.completed", "verification.verified", "verification.expired"]
        }
    }

    /// Walks one verification; true when every hop worked.
    func run(_ outcome: SandboxOutcome, explain: Bool) async -> Bool {
        let externalID = outcome.prefix + "user-" + RandomID.make().prefix(6)
        output("")
        output("▶ \(externalID)   (sandbox: \(outcome.summary))")

        let create = await call("POST", "/api/v1/idv/verifications", body: ["externalId": .string(externalID), "tier": "standard"])
        guard create.status == 201, let id = create.json?["id"]?.text else {
            return fail("1. app → sidecar → Kora   POST /api/v1/idv/verifications → \(create.summary)")
        }
        let stored = simulator.verification(id)
        guard stored?["callbackUrl"]?.text == webhookURL, stored?["tenantId"]?.text == "demo-tenant" else {
            return fail("1. Kora did not receive the callbackUrl and tenant id the sidecar should have added")
        }
        step("1. app → sidecar → Kora   POST /api/v1/idv/verifications → 201 \(id)")
        if explain { output("                             (the sidecar swapped the app's token for Kora's key, added X-Tenant-ID and callbackUrl)") }

        let complete = await call("POST", "/api/v1/idv/verifications/\(id)/complete", body: nil)
        guard complete.status == 200, let status = complete.json?["status"]?.text else {
            return fail("2. app → sidecar → Kora   POST …/\(id)/complete → \(complete.summary)")
        }
        let later = outcome == .slow ? "   (Kora decides in \(Self.text(options.slowDelay)))" : ""
        step("2. app → sidecar → Kora   POST …/complete → 200, status \(status)\(later)")

        var ok = true
        for type in Self.expectedEvents(outcome) {
            ok = await follow(type, of: id, explain: explain) && ok
        }
        if ok { output("  ✓ every hop worked") }
        return ok
    }

    /// Follows one event from Kora through the sidecar to the app.
    private func follow(_ type: String, of id: String, explain: Bool) async -> Bool {
        let timeout = options.stepTimeout + (type == "verification.expired" ? options.expiryDelay : .zero)
        let sends = await simulator.sent.wait(timeout: timeout + options.slowDelay) { sent in
            Set(sent.filter { $0.verificationID == id && $0.eventType == type && $0.accepted }.map(\.destination)).count == 2
        }
        let attempts = await simulator.sent.all.filter { $0.verificationID == id && $0.eventType == type }
        guard sends, let first = attempts.first(where: { $0.destination == .callbackURL && $0.accepted }),
            let second = attempts.first(where: { $0.destination == .dashboardURL && $0.accepted })
        else {
            let seen = attempts.map { "\($0.destination.rawValue) → \($0.statusCode.map(String.init) ?? $0.response)" }
            return fail("3. Kora → sidecar         \(type) was not accepted at both URLs (\(seen.joined(separator: "; ")))")
        }
        guard !first.response.contains("duplicate") else {
            return fail("3. Kora → sidecar         \(type) via callbackUrl was taken for a duplicate: \(first.response)")
        }
        step("3. Kora → sidecar         \(type) via callbackUrl → \(first.statusCode ?? 0) \(first.response)")
        if explain { output("                             (X-Signature checked over the raw bytes, event stored before the 200)") }
        guard second.response.contains("\"duplicate\":true") else {
            return fail("4. Kora → sidecar         the second copy was not recognised as a duplicate: \(second.response)")
        }
        step("4. Kora → sidecar         same event via dashboard URL → \(second.statusCode ?? 0) \(second.response)")
        if explain { output("                             (same event id: acknowledged so Kora stops, not delivered again)") }

        guard let delivered = await receiver.received.first(timeout: options.stepTimeout, where: { $0.id == first.eventID }) else {
            return fail("5. sidecar → app          \(type) did not reach the app")
        }
        guard delivered.signatureValid else {
            return fail("5. sidecar → app          \(type) arrived with a webhook-signature the app could not verify")
        }
        let what = delivered.alert.map { "fraud alert \($0.type) (\($0.severity))" } ?? "outcome \(delivered.outcome ?? "none")"
        step("5. sidecar → app          \(type) → \(what), webhook-signature valid (Standard Webhooks)")
        return true
    }

    /// Checks that no event reached the app twice (the duplicates stopped at the sidecar).
    func checkNothingDeliveredTwice() async -> Bool {
        let ids = await receiver.received.all.map(\.id)
        let twice = Dictionary(grouping: ids, by: { $0 }).filter { $0.value.count > 1 }.keys.sorted()
        if !twice.isEmpty {
            output("✗ delivered more than once: \(twice.joined(separator: ", "))")
            return false
        }
        return true
    }

    func printTryIt() {
        output("")
        output("Everything keeps running. Try it (Ctrl-C stops):")
        output(
            "  curl -s -X POST \(internalURL)/api/v1/idv/verifications -H 'Authorization: Bearer \(serviceToken)'"
                + " -H 'Content-Type: application/json' -d '{\"externalId\":\"test-review-me\"}'")
        output("  curl -s -X POST \(internalURL)/api/v1/idv/verifications/VERIFICATION_ID/complete -H 'Authorization: Bearer \(serviceToken)'")
        output(
            "  curl -s -X POST \(internalURL)/api/verifications -H 'Authorization: Bearer \(serviceToken)'"
                + " -H 'Content-Type: application/json' -d '{\"userId\":\"test-fraud-me\"}'")
        output("  curl -s '\(internalURL)/admin/deliveries?limit=5'")
    }

    // MARK: Helpers

    struct Answer {
        var status: Int
        var body: String
        var json: JSONValue?
        var summary: String { status == 0 ? body : "\(status) \(body)" }
    }

    /// Calls the sidecar's internal listener as the app, with the app's token.
    private func call(_ method: String, _ path: String, body: JSONValue?) async -> Answer {
        var request = HTTPClientRequest(url: internalURL + path)
        request.method = .init(rawValue: method)
        request.headers.add(name: "Authorization", value: "Bearer " + serviceToken)
        if let body {
            request.headers.add(name: "Content-Type", value: "application/json")
            request.body = .bytes(ByteBuffer(bytes: JSONWriter.encode(body)))
        }
        do {
            let response = try await client.execute(request, timeout: .seconds(30))
            let bytes = try await response.body.collect(upTo: 1 << 20)
            let text = String(buffer: bytes)
            return Answer(status: Int(response.status.code), body: text, json: try? JSONParser.parse(Array(text.utf8)))
        } catch {
            return Answer(status: 0, body: "no answer: \(HTTPClientFailure.describe(error))", json: nil)
        }
    }

    private func step(_ text: String) { output("  ✓ " + text) }

    private func fail(_ text: String) -> Bool {
        output("  ✗ " + text)
        return false
    }

    static func text(_ duration: Duration) -> String {
        let milliseconds = duration.milliseconds
        return milliseconds % 1000 == 0 ? "\(milliseconds / 1000) s" : "\(milliseconds) ms"
    }
}
