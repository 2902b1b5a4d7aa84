import NIOConcurrencyHelpers
import Foundation
import Hummingbird
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

/// The real binary as operators run it: crash safety, graceful shutdown, the command line.
@Suite("The kora-sidecar process", .serialized)
struct ProcessTests {
    @Test func killNineLosesNoAcknowledgedEvent() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        // Every event fails its first attempt, so that many are pending when the process dies.
        let service = FirstAttemptRefused()
        try await withReceiver(service.receiver) { (port: Int) async throws in
            let config = try writeProcessConfig(directory: directory, receiverPort: port)
            let first = try SidecarProcess(config: config)
            let sidecar = try await first.running()
            // The process dies under sixteen requests in flight, after 250 were sent. Each request may take
            // as long as a loaded machine needs to be answered; once the process is gone, those left are given up.
            let acked = try await sendSixteenInFlight(250, prefix: "evt_kill_", timeout: .seconds(30), to: { _ in sidecar }) {
                first.signal(SIGKILL)
            } thenGiveUpOnceDead: {
                _ = try await first.exitStatus()
            }
            #expect(try await first.exitStatus() == SIGKILL)
            #expect(acked.count >= 200, "only \(acked.count) events were acknowledged before the kill")
            #expect(service.taken.count < acked.count, "nothing was pending when the process died")

            let second = try SidecarProcess(config: config)
            _ = try await second.ports()
            try await waitUntil("every acknowledged event to be delivered", timeout: .seconds(60)) {
                acked.isSubset(of: service.taken)
            }
            second.signal(SIGTERM)
            try await second.expectCleanExit()
        }
    }

    @Test func sigtermFinishesInFlightDeliveriesAndExitsZero() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let gate = Gate()
        let receiver = Receiver.held(by: gate)
        try await withReceiver(receiver) { (port: Int) async throws in
            let config = try writeProcessConfig(directory: directory, receiverPort: port)
            let child = try SidecarProcess(config: config)
            let sidecar = try await child.running()
            #expect(try await sendSigned(TestEvent.body(eventID: "evt_drain"), to: sidecar).status == 200)
            _ = try await receiver.waitFor(1)
            child.signal(SIGTERM)
            // The listener stops accepting while the delivery is still in flight...
            try await waitUntil("the webhook listener to close") { (try? RawConnection(port: sidecar.webhookPort)) == nil }
            gate.open()
            // ...and the delivery finishes before the process exits 0, with the store closed cleanly
            // (its write-ahead log checkpointed into the file and removed).
            try await child.expectCleanExit()
            #expect(!FileManager.default.fileExists(atPath: directory + "/store.sqlite-wal"))
            let listed = try await Binary.run(["deliveries", "list", "--status", "delivered", "--config", config])
            #expect(listed.status == 0)
            #expect(listed.stdout.contains("evt_drain"))
            // One service's deliveries, as the alerts' runbooks list them.
            let own = try await Binary.run(["deliveries", "list", "--status", "delivered", "--service", "app", "--config", config])
            #expect(own.stdout.contains("evt_drain"), "\(own)")
            let other = try await Binary.run(["deliveries", "list", "--status", "delivered", "--service", "other", "--config", config])
            #expect(other.status == 0 && !other.stdout.contains("evt_drain"), "\(other)")
            #expect(child.log.contains { $0.contains("\"level\":\"info\"") })
        }
    }

    @Test func operatorsManageDeliveriesWhileServeRuns() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let healthy = NIOLockedValueBox(false)
        let receiver = Receiver { _, _ in healthy.withLockedValue { $0 } ? .ok : .internalServerError }
        try await withReceiver(receiver) { (port: Int) async throws in
            let config = try writeProcessConfig(directory: directory, receiverPort: port, retrySchedule: ["50ms"])
            let child = try SidecarProcess(config: config)
            let sidecar = try await child.running()
            for index in 0..<3 {
                #expect(try await sendSigned(TestEvent.body(eventID: "evt_cli_\(index)"), to: sidecar).status == 200)
            }
            try await waitUntil("three dead deliveries") {
                let listed = try await Binary.run(["deliveries", "list", "--status", "dead", "--config", config])
                return listed.stdout.components(separatedBy: "\"status\": \"dead\"").count - 1 == 3
            }
            let shown = try await Binary.run(["deliveries", "show", "1", "--config", config])
            #expect(shown.status == 0)
            #expect(shown.stdout.contains("\"statusCode\": 500"))
            #expect(try await Binary.run(["deliveries", "show", "999", "--config", config]).status == 1)
            healthy.withLockedValue { $0 = true }
            let retried = try await Binary.run(["deliveries", "retry", "--all-dead", "--config", config])
            #expect(retried.stdout.contains("3 dead deliveries"))
            try await waitUntil("the re-queued deliveries to arrive") { receiver.deliveries.filter { $0.header("X-Kora-Delivery-Attempt") == "3" }.count == 3 }
            #expect(try await Binary.run(["deliveries", "retry", "--config", config]).status == 2)
            child.signal(SIGTERM)
            try await child.expectCleanExit()
        }
    }

    @Test func aHundredThousandPendingDeliveriesDrainWithBoundedMemory() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let total = 100_000
        // The backlog a service leaves after a day down, written straight into the store.
        // With the key file the child will find beside the store, as a first start would have made it.
        var storage = StorageConfiguration()
        storage.sqlitePath = directory + "/store.sqlite"
        let key = SealingKey.generate(id: "backlog")
        try KeyFile.create(storage.keyFilePath, key: key)
        let store = try SQLiteStore(path: storage.sqlitePath, protection: try storage.protection())
        let template = try EventNormalizer.normalize(body: TestEvent.body(eventID: "evt_template"), webhookID: nil, receivedAt: .now())
        let now = UnixTime.now()
        for chunk in stride(from: 0, to: total, by: 500) {
            try await withThrowingTaskGroup(of: Void.self) { group in
                for index in chunk..<min(chunk + 500, total) {
                    var event = template
                    event.id = "evt_backlog_\(index)"
                    event.dedupKeys = [event.id]
                    // A backlog of many verifications, as a day's traffic is (one verification's events go in order).
                    event.verificationID = "ver_backlog_\(index)"
                    group.addTask { _ = try await store.enqueue(event, services: ["app"], at: now, dedupSince: now) }
                }
                try await group.waitForAll()
            }
        }
        store.close()

        let counter = Receiver(recording: false)
        try await withReceiver(counter) { (port: Int) async throws in
            let config = try writeProcessConfig(directory: directory, receiverPort: port)
            let child = try SidecarProcess(config: config)
            _ = try await child.ports()
            let idle = child.residentKilobytes
            var peak = idle
            try await waitUntil("the backlog to drain", timeout: .seconds(600)) {
                peak = max(peak, child.residentKilobytes)
                return counter.count >= total
            }
            child.signal(SIGTERM)
            try await child.expectCleanExit()
            // Deliveries are read one lease at a time, never all at once: memory stays near its idle level.
            #expect(peak < idle + 64 * 1024, "peak RSS \(peak) kB against \(idle) kB idle")
            let pending = try await Binary.run(["deliveries", "list", "--status", "pending", "--limit", "5", "--config", config])
            #expect(pending.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "[]")
        }
    }

    @Test func operatorCommandsSayTheirMistakesWithTheirOwnUsage() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let config = try writeProcessConfig(directory: directory, receiverPort: 9, services: #"[{"name": "a", "token": "t1"}, {"name": "b", "token": "t2"}]"#)
        let pending = try await Binary.run(["deliveries", "retry", "--status", "pending", "--config", config])
        #expect(pending.status == 2 && pending.stderr.contains("--status must be dead, delivered or unrouted, not pending."), "\(pending)")
        #expect(pending.stderr.contains("Usage: kora-sidecar deliveries retry"), "\(pending)")
        let noSecret = try await Binary.run(["send-test-event", "--to", "http://127.0.0.1:9/webhooks/koraidv"])
        #expect(noSecret.status == 2 && noSecret.stderr.contains("Usage: kora-sidecar send-test-event"), "\(noSecret)")
        // A service no longer configured may still have deliveries: said, not refused.
        try SQLiteStore(path: directory + "/store.sqlite", protection: .sealedForTests).close()
        let typo = try await Binary.run(["deliveries", "list", "--service", "tsl", "--config", config])
        #expect(typo.status == 0 && typo.stderr.contains("warning: no configured service is named tsl (configured: a, b)"), "\(typo)")
        #expect(!(try await Binary.run(["deliveries", "list", "--service", "a", "--config", config])).stderr.contains("warning"))
        // check-config reads the certificate files serve reads.
        let tls = directory + "/tls.json"
        try #"{"webhooks": {"secrets": ["s"], "tls": {"certificateFile": "\#(directory)/none.pem", "privateKeyFile": "\#(directory)/none.key"}}}"#
            .write(toFile: tls, atomically: true, encoding: .utf8)
        let check = try await Binary.run(["check-config", "--config", tls])
        #expect(check.status == 1 && check.stderr.contains("\(directory)/none.pem (webhooks.tls.certificateFile) does not exist."), "\(check)")
    }

    /// `serve` with one service, "app", whose proxy calls `base` as Kora, with `settings` added to
    /// the `kora` section.
    private func proxySidecarProcess(kora base: String, settings: String, directory: String) throws -> SidecarProcess {
        let path = directory + "/config.json"
        try """
            {"kora": {"apiBaseURL": "\(base)", "apiKey": "\(ProxySecrets.apiKey)", "tenantId": "\(ProxySecrets.tenant)", \(settings)},
             "webhooks": {"listen": {"host": "127.0.0.1", "port": 0}, "secrets": ["\(TestSecrets.webhook)"]},
             "internal": {"listen": {"host": "127.0.0.1", "port": 0}},
             "services": [{"name": "app"}], "storage": {"sqlitePath": "\(directory)/store.sqlite"}}
            """.write(toFile: path, atomically: true, encoding: .utf8)
        return try SidecarProcess(config: path)
    }

    @Test func aStopEndsKorasRetriesOfAProxiedCallInsteadOfWaitingThemOut() async throws {
        // Kora asks to wait 30 s, twice: the stop waited for the call's whole minute, past the
        // deploy files' 45 s grace period, and ended in SIGKILL.
        let kora = ScriptedKora(Array(repeating: .answer(429, [("Retry-After", "30")], #"{"code":"RATE_LIMIT_EXCEEDED"}"#), count: 3))
        try await withScriptedKora(kora) { base in
            let directory = try temporaryDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let process = try proxySidecarProcess(kora: base, settings: #""timeoutSeconds": 5"#, directory: directory)
            let sidecar = try await process.running()
            let sdk = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: nil)
            async let answer = sdk.call(.GET, "/verifications/ver_held")
            try await waitUntil("Kora's first 429") { kora.requests.count == 1 }
            process.signal(SIGTERM)
            #expect(try await answer.status == 503)
            try await process.expectCleanExit()
            #expect(kora.requests.count == 1)
        }
    }

    @Test func aStopEndsACallsWaitForItsTurnInTheKorasBudget() async throws {
        // One call a minute, and a call may wait five: the second call waited out its turn (or
        // maxWait) through the stop, past the deploy files' 45 s grace period, and ended in SIGKILL.
        let kora = ScriptedKora([.answer(200, [], #"{"id":"ver_1"}"#), .answer(200, [], #"{"id":"ver_2"}"#)])
        try await withScriptedKora(kora) { base in
            let directory = try temporaryDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let process = try proxySidecarProcess(kora: base, settings: #""rateLimit": {"perMinute": 1, "maxWait": "5m"}"#, directory: directory)
            let sidecar = try await process.running()
            let sdk = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: nil)
            #expect(try await sdk.call(.GET, "/verifications/ver_1").status == 200)
            async let held = sdk.call(.GET, "/verifications/ver_2")
            try await waitUntil("the second call to wait for its turn") {
                try await get(sidecar.internalURL("/metrics")).body.contains("kora_sidecar_kora_calls_waiting 1")
            }
            process.signal(SIGTERM)
            #expect(try await held.status == 503)
            try await process.expectCleanExit()
            #expect(kora.requests.count == 1)
        }
    }

    @Test func checkConfigPrintsTheEffectiveConfigurationOrEveryProblem() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let good = directory + "/good.json"
        try #"{"webhooks": {"secrets": [{"env": "WEBHOOK_SECRET"}]}, "kora": {"apiKey": "literal-api-key-value"}}"#
            .write(toFile: good, atomically: true, encoding: .utf8)
        let valid = try await Binary.run(["check-config", "--config", good], environment: ["WEBHOOK_SECRET": "whsec_env_value_123"])
        #expect(valid.status == 0)
        #expect(valid.stdout.contains("\"mode\": \"queued\""))
        #expect(!valid.stdout.contains("whsec_env_value_123"))
        #expect(!valid.stdout.contains("literal-api-key-value"))
        // No service: nobody may call the proxy, and nobody receives events; both are said.
        #expect(valid.stderr.contains("warning: No service is configured (services): the API proxy refuses every call with 401"))
        #expect(valid.stderr.contains("warning: No service receives events"))

        let bad = directory + "/bad.json"
        try #"{"webhooks": {"secrets": [{"env": "NOPE"}], "port": 1}, "delivery": {"mode": "sometimes"}}"#
            .write(toFile: bad, atomically: true, encoding: .utf8)
        let invalid = try await Binary.run(["check-config", "--config", bad])
        #expect(invalid.status == 1)
        for path in ["$.webhooks.secrets[0]", "$.webhooks.port", "$.delivery.mode"] {
            #expect(invalid.stderr.contains(path), "\(path) not reported: \(invalid.stderr)")
        }
        let missing = try await Binary.run(["check-config", "--config", directory + "/absent.json"])
        #expect(missing.status == 1)
        #expect(missing.stderr.contains("absent.json"))
        #expect(try await Binary.run(["check-config", "--bogus-flag"]).status == 2)
        let unbounded = try await Binary.run(["deliveries", "list", "--limit=-1", "--config", good])
        #expect(unbounded.status == 2 && unbounded.stderr.contains("--limit must be from 1 to 100000"), "\(unbounded)")
        let unknownStatus = try await Binary.run(["deliveries", "list", "--status", "bogus", "--config", good])
        #expect(unknownStatus.status == 2 && unknownStatus.stderr.contains("--status must be pending"), "\(unknownStatus)")
        let serviceOfNothing = try await Binary.run(["deliveries", "list", "--status", "unrouted", "--service", "app", "--config", good])
        #expect(serviceOfNothing.status == 2 && serviceOfNothing.stderr.contains("--service selects deliveries"), "\(serviceOfNothing)")
        #expect(try await Binary.run(["no-such-command"]).status == 2)
    }

    @Test func startupFailuresExitOneWithOneSentence() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let blocker = try RawListener()
        let busy = directory + "/busy.json"
        try """
            {"webhooks": {"listen": {"host": "127.0.0.1", "port": \(blocker.port)}, "secrets": ["s"]},
             "internal": {"listen": {"host": "127.0.0.1", "port": 0}}, "storage": {"sqlitePath": "\(directory)/a.sqlite"}}
            """.write(toFile: busy, atomically: true, encoding: .utf8)
        let portInUse = try await Binary.run(["serve", "--config", busy])
        #expect(portInUse.status == 1)
        #expect(portInUse.stderr.contains("\(blocker.port)") && portInUse.stderr.contains("webhooks.listen"), "\(portInUse.stderr)")

        try "not a directory".write(toFile: directory + "/file", atomically: true, encoding: .utf8)
        let unwritable = directory + "/unwritable.json"
        try """
            {"webhooks": {"listen": {"host": "127.0.0.1", "port": 0}, "secrets": ["s"]},
             "internal": {"listen": {"host": "127.0.0.1", "port": 0}}, "storage": {"sqlitePath": "\(directory)/file/store.sqlite"}}
            """.write(toFile: unwritable, atomically: true, encoding: .utf8)
        let store = try await Binary.run(["serve", "--config", unwritable])
        #expect(store.status == 1)
        #expect(store.stderr.contains("storage.sqlitePath"))

        let secretFile = directory + "/secretfile.json"
        try #"{"webhooks": {"secrets": [{"file": "/nonexistent/secret"}]}}"#.write(toFile: secretFile, atomically: true, encoding: .utf8)
        let secret = try await Binary.run(["serve", "--config", secretFile])
        #expect(secret.status == 1)
        #expect(secret.stderr.contains("/nonexistent/secret"))
        #expect(!secret.stderr.contains("Fatal error"))
    }

    @Test func signPrintsKorasHeadersAndSendTestEventPostsThem() async throws {
        let body = Array(#"{"eventType":"verification.completed","data":{}}"#.utf8)
        let signed = try await Binary.run(["sign", "--secret", "whsec_cli", "--timestamp", "1795000000"], input: body)
        #expect(signed.status == 0)
        let expected = KoraSignature.timestamped(secret: Secret("whsec_cli"), timestamp: "1795000000", body: body)
        #expect(signed.stdout == "X-Signature: \(expected)\nX-Timestamp: 1795000000\nX-Signature-Algorithm: sha256\n")
        let legacy = try await Binary.run(["sign", "--secret", "whsec_cli", "--scheme", "legacy"], input: body)
        #expect(legacy.stdout == "X-Kora-Signature: \(KoraSignature.legacy(secret: Secret("whsec_cli"), body: body))\n")
        #expect(try await Binary.run(["sign", "--secret", "s", "--scheme", "md5"], input: body).status == 2)
        // The secret from the variable serve reads, out of `ps`'s sight; without either, a sentence.
        let fromEnvironment = try await Binary.run(
            ["sign", "--timestamp", "1795000000"], environment: ["KORAIDV_WEBHOOK_SECRET": "whsec_cli"], input: body)
        #expect(fromEnvironment.stdout == signed.stdout)
        let without = try await Binary.run(["sign"], input: body)
        #expect(without.status != 0)
        #expect(without.stderr.contains("Set KORAIDV_WEBHOOK_SECRET to the webhook secret, or give --secret."))

        let receiver = Receiver()
        try await withReceiver(receiver) { (port: Int) async throws in
            let configuration = testConfiguration(services: [testService("app", target: .url("http://127.0.0.1:\(port)/events"))])
            var options = SidecarOptions()
            options.store = InMemoryStore()
            try await withSidecar(configuration, options: options) { (sidecar: RunningSidecar) async throws in
                // A rejection's decision is a rejection's unless told otherwise.
                let sent = try await Binary.run([
                    "send-test-event", "--to", sidecar.webhookURL, "--secret", TestSecrets.webhook, "--type", "verification.rejected",
                    "--external-id", "user-9",
                ])
                #expect(sent.stdout.hasPrefix("200 "))
                let delivery = try #require(try await receiver.waitFor(1).first)
                #expect(delivery.json?["verification"]?["outcome"] == "rejected")
                #expect(delivery.json?["verification"]?["externalId"] == "user-9")
                let refused = try await Binary.run(["send-test-event", "--to", sidecar.webhookURL, "--secret", "whsec_wrong"])
                #expect(refused.stdout.hasPrefix("401 "))
                let badPort = try await Binary.run(["send-test-event", "--to", "http://127.0.0.1:99999/webhooks/koraidv", "--secret", "s"])
                #expect(badPort.status == 2 && badPort.stderr.contains("--to must have a port from 1 to 65535"), "\(badPort)")
                let badDecision = try await Binary.run(["send-test-event", "--to", sidecar.webhookURL, "--secret", "s", "--decision", "approve"])
                #expect(badDecision.status == 2 && badDecision.stderr.contains("--decision must be one of auto_approve, auto_reject, manual_review."))
                // Nothing listening: said at once, in words, not after the 30 s deadline.
                let nobody = try await Binary.run(["send-test-event", "--to", "http://127.0.0.1:\(try freePort())/webhooks/koraidv", "--secret", "s"])
                #expect(nobody.status == 1 && nobody.stderr.contains("could not be sent to") && nobody.stderr.contains(": connection refused."), "\(nobody)")
            }
        }
    }
}

/// Event ids the sidecar acknowledged with 200.
final class Acknowledged: Sendable {
    private let storage = NIOLockedValueBox<Set<String>>([])
    /// Whether `id` is new.
    @discardableResult func insert(_ id: String) -> Bool { storage.withLockedValue { $0.insert(id).inserted } }
    var ids: Set<String> { storage.withLockedValue { $0 } }
}

/// A service that refuses every event's first delivery attempt and takes the next, so that work is
/// pending when a process dies.
final class FirstAttemptRefused: Sendable {
    private let accepted = Acknowledged()
    let receiver: Receiver

    init() {
        let seen = Acknowledged(), accepted = accepted
        receiver = Receiver(recording: false) { delivery, _ in
            let id = delivery.header("webhook-id") ?? ""
            guard !seen.insert(id) else { return .serviceUnavailable }
            accepted.insert(id)
            return .ok
        }
    }

    /// The event ids delivered (taken on a later attempt).
    var taken: Set<String> { accepted.ids }
}

/// Sends `count` signed events with ids `prefix` + index, `target(index)` receiving each, sixteen in
/// flight; calls `whileInFlight` once the last is sent, before the last answers. Once `dead` returns
/// (the process that would answer them has died), the requests still waiting are given up: they would
/// otherwise retry their connection until their time-out. Returns the ids answered 200.
func sendSixteenInFlight(
    _ count: Int, prefix: String, timeout: Duration, to target: @escaping @Sendable (Int) -> RunningSidecar,
    whileInFlight: () -> Void, thenGiveUpOnceDead dead: (() async throws -> Void)? = nil
) async throws -> Set<String> {
    let acknowledged = Acknowledged()
    try await withThrowingTaskGroup(of: Void.self) { group in
        for index in 0..<count {
            if index >= 16 { try await group.next() }
            group.addTask {
                let id = prefix + "\(index)"
                let answer = try? await sendSigned(TestEvent.body(eventID: id), to: target(index), timeout: timeout)
                if answer?.status == 200 { acknowledged.insert(id) }
            }
        }
        whileInFlight()
        if let dead {
            try await dead()
            group.cancelAll()
        }
        try await group.waitForAll()
    }
    return acknowledged.ids
}

/// A TCP listener held open by the test (to make a port busy).
final class RawListener {
    let fd: Int32
    let port: Int

    init() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        self.fd = fd
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        _ = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        listen(fd, 1)
        var bound = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &bound) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
        port = Int(UInt16(bigEndian: bound.sin_port))
    }

    deinit { close(fd) }
}
