import NIOConcurrencyHelpers
import Foundation
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

/// Every command of the real binary and every error path, run with known, distinctive secret
/// values: none may appear in any log line, error body, `/metrics` or `check-config` output.
@Suite("Secret hygiene", .serialized)
struct SecretHygieneTests {
    /// One marker in every secret, so that even part of one (a prefix, a suffix) is found.
    static let marker = "HYGIENE" + TestSecrets.unique.uppercased()
    static let webhook = "whsec_wh_\(marker)_a"
    static let webhookFromFile = "whsec_wh_\(marker)_b"
    static let apiKey = "sk_live_\(marker)_key"
    static let tenant = "tenant_\(marker)"
    static let token = "tok_\(marker)_app"
    static let admin = "adm_\(marker)"
    /// A Standard Webhooks secret (base64 of at least 24 bytes) carrying the marker.
    static let signing = "whsec_" + Data("sign-\(marker)-0123456789abcdef".utf8).base64EncodedString()
    static var all: [String] { [webhook, webhookFromFile, apiKey, tenant, token, admin, signing, marker] }
    static let environment = ["KS_HYG_WEBHOOK": webhook, "KS_HYG_API_KEY": apiKey, "KS_HYG_ADMIN": admin]

    /// What the sidecar said, gathered from every channel.
    final class Outputs: Sendable {
        private let texts = NIOLockedValueBox<[(String, String)]>([])
        func add(_ what: String, _ text: String) { texts.withLockedValue { $0.append((what, text)) } }
        func add(_ what: String, _ run: (status: Int32, stdout: String, stderr: String)) { add(what, run.stdout + run.stderr) }
        var all: [(String, String)] { texts.withLockedValue { $0 } }
    }

    func writeConfig(directory: String, receiverPort: Int, koraBase: String) throws -> String {
        try Self.tenant.write(toFile: directory + "/tenant", atomically: true, encoding: .utf8)
        try (Self.webhookFromFile + "\n").write(toFile: directory + "/webhook2", atomically: true, encoding: .utf8)
        let path = directory + "/config.json"
        try """
            {
              "kora": {"apiBaseURL": "\(koraBase)", "apiKey": {"env": "KS_HYG_API_KEY"}, "tenantId": {"file": "\(directory)/tenant"},
                       "timeoutSeconds": 5, "retry": {"maxAttempts": 1}},
              "webhooks": {"listen": {"host": "127.0.0.1", "port": 0}, "secrets": [{"env": "KS_HYG_WEBHOOK"}, {"file": "\(directory)/webhook2"}]},
              "internal": {"listen": {"host": "127.0.0.1", "port": 0}, "adminToken": {"env": "KS_HYG_ADMIN"}},
              "services": [{"name": "app", "token": "\(Self.token)",
                            "deliver": {"url": "http://127.0.0.1:\(receiverPort)/events", "signingSecret": "\(Self.signing)"}}],
              "delivery": {"mode": "queued", "retrySchedule": ["50ms"]},
              "storage": {"sqlitePath": "\(directory)/store.sqlite"},
              "logging": {"level": "debug", "format": "json"}
            }
            """.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    @Test func noSecretAppearsInAnyOutputOfAnyCommand() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let outputs = Outputs()
        // Kora answers each proxied call with one of its error classes.
        let kora = ScriptedKora(
            [400, 401, 403, 429, 500, 502, 503].map { .answer($0, [("Retry-After", "0")], #"{"error":"kora says \#($0)"}"#) } + [.close])
        let receiver = Receiver()
        try await withScriptedKora(kora) { koraBase in
            try await withReceiver(receiver) { (port: Int) async throws in
                let config = try writeConfig(directory: directory, receiverPort: port, koraBase: koraBase)
                let env = Self.environment
                let checked = try await Binary.run(["check-config", "--config", config], environment: env)
                #expect(checked.status == 0 && checked.stdout.contains("***"), "\(checked.stderr)")
                outputs.add("check-config", checked)
                // Error paths before serving: a missing variable, a missing file, an invalid file.
                outputs.add("check-config without variables", try await Binary.run(["check-config", "--config", config]))
                try FileManager.default.moveItem(atPath: directory + "/tenant", toPath: directory + "/tenant.moved")
                outputs.add("serve without the secret file", try await Binary.run(["serve", "--config", config], environment: env))
                try FileManager.default.moveItem(atPath: directory + "/tenant.moved", toPath: directory + "/tenant")
                let invalid = directory + "/invalid.json"
                let text = try String(contentsOfFile: config, encoding: .utf8)
                try text.replacingOccurrences(of: #""timeoutSeconds": 5"#, with: #""timeoutSeconds": -5, "unknown": 1"#)
                    .replacingOccurrences(of: "\"signingSecret\": \"whsec_", with: "\"signingSecret\": \"whsec_!")
                    .write(toFile: invalid, atomically: true, encoding: .utf8)
                outputs.add("check-config of an invalid file", try await Binary.run(["check-config", "--config", invalid], environment: env))

                let child = try SidecarProcess(config: config, environment: env)
                let ports = try await child.ports()
                let sidecar = RunningSidecar(webhookPort: ports.webhooks, internalPort: ports.internal, internalAddress: nil)
                try await exerciseServe(sidecar, kora: kora, receiver: receiver, outputs: outputs)
                outputs.add("send-test-event", try await Binary.run(["send-test-event", "--to", sidecar.webhookURL, "--secret", Self.webhook]))
                outputs.add("send-test-event, wrong secret", try await Binary.run(["send-test-event", "--to", sidecar.webhookURL, "--secret", Self.webhook + "x"]))
                for arguments in [["list"], ["list", "--status", "delivered"], ["show", "1"], ["show", "999"], ["retry", "1"], ["retry", "--all-dead"]] {
                    outputs.add("deliveries \(arguments)", try await Binary.run(["deliveries"] + arguments + ["--config", config], environment: env))
                }
                child.signal(SIGTERM)
                try await child.expectCleanExit()
                outputs.add("serve log", child.log.joined(separator: "\n"))
                #expect(child.log.count > 10, "the log is too short to prove anything")
            }
        }
        let body = Array(#"{"eventType":"verification.completed","data":{}}"#.utf8)
        let signed = try await Binary.run(["sign", "--secret", Self.webhook], input: body)
        #expect(signed.status == 0)
        outputs.add("sign", signed)
        outputs.add("sign, bad scheme", try await Binary.run(["sign", "--secret", Self.webhook, "--scheme", "md5"], input: body))
        // The simulator runs until interrupted: SIGINT once it says where it listens.
        let said = directory + "/simulate.out"
        let simulator = try Child(
            Binary.path, ["simulate", "--port", "0", "--webhook-secret", Self.webhook, "--api-key", Self.apiKey],
            environment: childEnvironment([:], path: "/usr/sbin:/usr/bin:/sbin:/bin"), output: .file(said), error: .sameAsOutput)
        defer { if simulator.isRunning { simulator.signal(SIGKILL) } }
        func simulated() -> String { (try? String(contentsOfFile: said, encoding: .utf8)) ?? "" }
        try await waitUntil("the simulator to listen", timeout: .seconds(30)) { simulated().contains("Kora simulator listening on") || !simulator.isRunning }
        simulator.signal(SIGINT)
        try await waitUntil("the simulator to stop on SIGINT", timeout: .seconds(30)) { !simulator.isRunning }
        #expect(simulated().contains("Kora simulator listening on"), "\(simulated())")
        outputs.add("simulate", simulated())

        let texts = outputs.all
        #expect(texts.count >= 20)
        for (what, text) in texts {
            for secret in Self.all {
                #expect(!text.contains(secret), "\(what) shows a secret: \(text.prefix(2000))")
            }
        }
    }

    /// Drives every path of a running sidecar that answers or logs, recording every body.
    func exerciseServe(_ sidecar: RunningSidecar, kora: ScriptedKora, receiver: Receiver, outputs: Outputs) async throws {
        let event = TestEvent.body(eventID: "evt_hygiene")
        for secret in [Self.webhook, Self.webhookFromFile] {
            outputs.add("webhook", try await sendSigned(TestEvent.body(), to: sidecar, secret: secret).body)
        }
        outputs.add("webhook", try await sendSigned(event, to: sidecar, secret: Self.webhook, scheme: .legacy).body)
        outputs.add("replay", try await sendSigned(event, to: sidecar, secret: Self.webhook).body)
        _ = try await receiver.waitFor(3)
        for (name, value) in [("X-Signature", String(repeating: "ab", count: 32)), ("X-Kora-Signature", "zz"), ("X-Signature-Algorithm", "md5")] {
            let answer = try await post(sidecar.webhookURL, body: event, headers: [(name, value), ("X-Timestamp", String(UnixTime.now().seconds))])
            #expect(answer.status >= 400)
            outputs.add("bad signature \(name)", answer.body)
        }
        outputs.add("stale", try await sendSigned(event, to: sidecar, secret: Self.webhook, timestamp: 1).body)
        outputs.add("unparseable", try await sendSigned(Array("{".utf8), to: sidecar, secret: Self.webhook).body)

        let proxy = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: Self.token)
        for apiKey in [nil, "wrong", Self.token + "x"] {
            let answer = try await SDKStyleClient(baseURL: proxy.baseURL, apiKey: apiKey).call(.GET, "/verifications/ver_1")
            #expect(answer.status == 401)
            outputs.add("proxy token \(apiKey ?? "none")", answer.body)
        }
        var statuses: Set<Int> = []
        for _ in 0..<8 {
            let answer = try await proxy.call(.GET, "/verifications/ver_1")
            statuses.insert(answer.status)
            outputs.add("proxy error \(answer.status)", answer.body)
        }
        // Kora's 4xx pass through; its 401/403 and 5xx and a lost connection become the proxy's own errors.
        #expect(kora.requests.count == 8)
        #expect(statuses.contains(400) && statuses.contains(429) && statuses.contains(502), "\(statuses)")
        for token in [nil, "wrong", Self.admin] {
            let answer = try await get(sidecar.internalURL("/admin/deliveries"), headers: token.map { [("Authorization", "Bearer \($0)")] } ?? [])
            outputs.add("admin \(token == nil ? "no token" : "token")", answer.body)
        }
        for path in ["/metrics", "/readyz", "/healthz"] {
            outputs.add(path, try await get(sidecar.internalURL(path)).body)
        }
    }
}
