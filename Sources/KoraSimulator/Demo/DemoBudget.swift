import AsyncHTTPClient
import KoraSidecar
import KoraSidecarCore
import NIOCore

/// The demo's last step: two services share one Kora key. A batch job floods the proxy while the
/// app calls a few times; the sidecar holds calls to Kora's rate (learned from `X-RateLimit-Limit`),
/// gives the app its turns, and Kora never has to refuse.
struct DemoBudget: Sendable {
    /// Kora's limit in the demo: calls per `window` seconds (Kora's own window is a minute).
    static let limit = 10
    static let window: Int64 = 2
    /// The sidecar's window: a quarter longer than Kora's, so that a call sent at the end of one of
    /// Kora's fixed windows and arriving in the next cannot go over (the sidecar keeps 5 % for a minute).
    static let sidecarWindow = Duration.milliseconds(2500)
    static let batchCalls = 20
    static let appCalls = 4
    static let batchToken = "demo-batch-token"

    let internalURL: String
    let appToken: String
    let output: @Sendable (String) -> Void

    /// Runs the flood and the app's calls; true when the app's calls all went and Kora refused none.
    func run() async -> Bool {
        output("")
        output("▶ one Kora key, two services   (Kora allows \(Self.limit) calls per \(Self.window) s here; a real plan allows 10, 50 or 200 a minute)")
        // A client per service, each free to have every call in flight at once, as two pods would.
        let batchClient = Self.client()
        let appClient = Self.client()
        let refusedBefore = await koraRefusals()
        let started = ContinuousClock.now
        let answers = await withTaskGroup(of: (service: String, status: Int, after: Duration).self) { group in
            for _ in 0..<Self.batchCalls {
                group.addTask { ("batch-job", await call(batchClient, token: Self.batchToken), .now - started) }
            }
            // The app calls once the batch job is already waiting for turns.
            if await !waitForMetric("kora_sidecar_kora_calls_waiting", timeout: .seconds(10), { $0 >= 5 }) {
                output("  (the batch job's calls were not seen waiting; the app calls anyway)")
            }
            for _ in 0..<Self.appCalls {
                group.addTask { ("demo-app", await call(appClient, token: appToken), .now - started) }
            }
            return await group.reduce(into: []) { $0.append($1) }
        }
        try? await batchClient.shutdown()
        try? await appClient.shutdown()

        let batch = answers.filter { $0.service == "batch-job" }
        let app = answers.filter { $0.service == "demo-app" }
        let batchWent = batch.filter { $0.status == 200 }
        let batchHeld = batch.filter { $0.status == 429 }
        var ok = true
        if batchWent.count + batchHeld.count == batch.count {
            let held = batchHeld.isEmpty ? "" : "; \(batchHeld.count) waited past kora.rateLimit.maxWait: 429 RATE_LIMITED from the sidecar"
            step("batch-job sent \(batch.count) calls at once → \(batchWent.count) answered 200 over \(Self.seconds(batch.map(\.after).max()))\(held)")
        } else {
            ok = fail("batch-job's calls: \(Self.statuses(batch))")
        }
        if app.allSatisfy({ $0.status == 200 }) {
            step("demo-app sent \(app.count) calls meanwhile → all 200, the last after \(Self.seconds(app.map(\.after).max()))")
            output("                             (waiting calls take turns by services[].share, so a flood cannot starve the app)")
        } else {
            ok = fail("demo-app's calls: \(Self.statuses(app))")
        }
        if await koraRefusals() > refusedBefore {
            ok = fail("Kora answered 4xx to the sidecar (see kora_sidecar_kora_requests_total)")
        } else {
            step("Kora refused none: the sidecar learned its limit from X-RateLimit-Limit and sent no call Kora would answer 429")
        }
        if ok { output("  ✓ the budget worked") }
        return ok
    }

    private static func client() -> HTTPClient {
        var configuration = HTTPClient.Configuration(redirectConfiguration: .disallow, timeout: .init(connect: .seconds(5), read: .seconds(60)))
        configuration.connectionPool = .init(idleTimeout: .seconds(5), concurrentHTTP1ConnectionsPerHostSoftLimit: 64)
        return HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
    }

    /// `GET /api/v1/idv/document-types` as the service holding `token`; the status, or 0 without an answer.
    private func call(_ client: HTTPClient, token: String) async -> Int {
        var request = HTTPClientRequest(url: internalURL + "/api/v1/idv/document-types?country=US")
        request.headers.add(name: "Authorization", value: "Bearer " + token)
        guard let response = try? await client.execute(request, timeout: .seconds(60)) else { return 0 }
        _ = try? await response.body.collect(upTo: 1 << 20)
        return Int(response.status.code)
    }

    /// How many of Kora's answers so far were 4xx.
    private func koraRefusals() async -> Double {
        await metric(#"kora_sidecar_kora_requests_total{status_class="4xx"}"#) ?? 0
    }

    /// The value of the sidecar's metric `name` (with its labels, as `/metrics` writes it), if present.
    private func metric(_ name: String) async -> Double? {
        guard let response = try? await HTTPClient.shared.execute(HTTPClientRequest(url: internalURL + "/metrics"), timeout: .seconds(10)),
            let body = try? await response.body.collect(upTo: 4 << 20)
        else { return nil }
        let line = String(buffer: body).split(separator: "\n").first { $0.hasPrefix(name + " ") }
        return line.flatMap { Double($0.dropFirst(name.count + 1)) }
    }

    /// Polls the sidecar's `name` metric until `condition` holds or `timeout` passes.
    private func waitForMetric(_ name: String, timeout: Duration, _ condition: (Double) -> Bool) async -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if let value = await metric(name), condition(value) { return true }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return false
    }

    private func step(_ text: String) { output("  ✓ " + text) }

    private func fail(_ text: String) -> Bool {
        output("  ✗ " + text)
        return false
    }

    private static func seconds(_ duration: Duration?) -> String {
        let milliseconds = (duration ?? .zero).milliseconds
        return "\(milliseconds / 1000).\(milliseconds % 1000 / 100) s"
    }

    private static func statuses(_ answers: [(service: String, status: Int, after: Duration)]) -> String {
        Dictionary(grouping: answers, by: \.status).sorted { $0.key < $1.key }
            .map { "\($0.value.count) × \($0.key == 0 ? "no answer" : String($0.key))" }.joined(separator: ", ")
    }
}
