import Foundation
import Hummingbird
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

/// The public listener against SPEC §4, on real loopback listeners.
@Suite("Webhook ingress")
struct IngressTests {
    func event(_ id: String = "evt_" + RandomID.make(), type: String = "verification.completed") -> [UInt8] {
        TestEvent.body(type: type, eventID: id)
    }

    func directSidecar(
        receiver: Receiver, store: InMemoryStore = InMemoryStore(), logs: TestLogs = TestLogs(),
        configure: @Sendable (inout SidecarConfiguration) -> Void = { _ in },
        options: SidecarOptions = .init(), _ body: @escaping @Sendable (RunningSidecar) async throws -> Void
    ) async throws {
        try await withReceiver(receiver) { port in
            var configuration = testConfiguration(services: [testService("app", target: .url("http://127.0.0.1:\(port)/events"))])
            configure(&configuration)
            var options = options
            options.store = store
            try await withSidecar(configuration, options: options, logs: logs, body)
        }
    }

    @Test func acceptsOnceAndAcknowledgesDuplicates() async throws {
        let receiver = Receiver()
        try await directSidecar(receiver: receiver) { (sidecar: RunningSidecar) async throws in
            let body = event("evt_once")
            let first = try await sendSigned(body, to: sidecar)
            #expect(first.status == 200)
            #expect(first.json == ["received": true])
            let again = try await sendSigned(body, to: sidecar, scheme: .legacy)
            #expect(again.status == 200)
            #expect(again.json == ["received": true, "duplicate": true])
            #expect(receiver.count == 1)
        }
    }

    @Test func rejectsEachSignatureProblemWithItsCode() async throws {
        let receiver = Receiver()
        try await directSidecar(receiver: receiver) { (sidecar: RunningSidecar) async throws in
            let body = event()
            let now = UnixTime.now().seconds
            let missing = try await post(sidecar.webhookURL, body: body, headers: [])
            let wrong = try await sendSigned(body, to: sidecar, secret: "whsec_wrong")
            let stale = try await sendSigned(body, to: sidecar, timestamp: now - 301)
            let future = try await sendSigned(body, to: sidecar, timestamp: now + 400)
            var headers = KoraSignature.headers(scheme: .timestamped, secret: Secret(TestSecrets.webhook), body: body, timestamp: now)
            headers[2].value = "sha1"
            let algorithm = try await post(sidecar.webhookURL, body: body, headers: headers.map { ($0.name, $0.value) })
            let notANumber = try await post(
                sidecar.webhookURL, body: body, headers: [("X-Signature", String(repeating: "a", count: 64)), ("X-Timestamp", "abc")])
            let badHex = try await post(sidecar.webhookURL, body: body, headers: [("X-Kora-Signature", "not-hex!")])
            for (answer, code) in [
                (missing, "MISSING_SIGNATURE"), (wrong, "INVALID_SIGNATURE"), (stale, "STALE_TIMESTAMP"), (future, "STALE_TIMESTAMP"),
                (algorithm, "UNSUPPORTED_ALGORITHM"), (notANumber, "STALE_TIMESTAMP"), (badHex, "INVALID_SIGNATURE"),
            ] {
                #expect(answer.status == 401)
                #expect(answer.code == code)
                #expect(answer.json?["error"]?.text?.isEmpty == false)
                guard case .object(let members)? = answer.json else { continue }
                #expect(members.map(\.key) == ["code", "error"])
            }
            #expect(receiver.count == 0)
        }
    }

    @Test func aWebhookKoraSignedThatArrivesLateIsRefusedAndSaidLoudly() async throws {
        // Kora's retry policy is not published: a retry sent with its first timestamp, after a long
        // store outage, is refused as stale, and its event is lost unless an operator hears of it.
        let receiver = Receiver()
        let logs = TestLogs()
        let store = InMemoryStore()
        try await directSidecar(receiver: receiver, store: store, logs: logs) { (sidecar: RunningSidecar) async throws in
            let now = UnixTime.now().seconds
            let late = try await sendSigned(event("evt_sent_late"), to: sidecar, timestamp: now - 900)
            let forged = try await sendSigned(event("evt_forged_late"), to: sidecar, secret: "whsec_not_ours", timestamp: now - 900)
            // An event the sidecar took is not lost when it comes again late (Kora again, or a replay).
            #expect(try await sendSigned(event("evt_taken"), to: sidecar).status == 200)
            _ = try await receiver.waitFor(1)
            try await waitUntil("the delivered id remembered") { try await store.isDuplicate(eventID: "evt_taken", since: UnixTime(milliseconds: 0)) }
            let again = try await sendSigned(event("evt_taken"), to: sidecar, timestamp: now - 900)
            #expect([late.code, forged.code, again.code] == ["STALE_TIMESTAMP", "STALE_TIMESTAMP", "STALE_TIMESTAMP"])
            let metrics = try await get(sidecar.internalURL("/metrics")).body
            #expect(metrics.contains("kora_sidecar_webhooks_signed_late_total 1"), "\(metrics)")
            let said = logs.all.filter { $0.contains("arrived outside webhooks.toleranceSeconds: its event is not accepted") }
            #expect(said.count == 1)
            #expect(said.first?.contains("evt_sent_late") == true)
            #expect(said.first?.contains("\(now - 900)") == true)
            #expect(logs.all.contains { $0.contains("its event was accepted before") && $0.contains("evt_taken") })
            #expect(receiver.count == 1)
        }
    }

    @Test func aLegacySignedWebhookTheDeduplicationWindowNoLongerCoversIsRefused() async throws {
        // A legacy signature never expires: once the event's id is forgotten, only the time its
        // signed body states tells Kora's webhook from a replay of one captured a week ago.
        let receiver = Receiver()
        let logs = TestLogs()
        let now = UnixTime(milliseconds: 1_795_000_000_000)
        var options = SidecarOptions()
        options.clock = { now }
        try await directSidecar(receiver: receiver, logs: logs, configure: { $0.webhooks.dedupWindowHours = 24 }, options: options) {
            (sidecar: RunningSidecar) async throws in
            func stated(_ secondsAgo: Int64, _ id: String) -> [UInt8] {
                TestEvent.body(eventID: id, at: UnixTime(milliseconds: now.milliseconds - secondsAgo * 1000))
            }
            // The window less the clock tolerance (300 s) is the limit.
            let replayed = try await sendSigned(stated(24 * 3600, "evt_week_old"), to: sidecar, scheme: .legacy)
            let edge = try await sendSigned(stated(24 * 3600 - 301, "evt_within"), to: sidecar, scheme: .legacy)
            let old = Array(#"{"eventType":"verification.completed","id":"evt_no_time","data":{"verificationId":"ver_1"}}"#.utf8)
            let timeless = try await sendSigned(old, to: sidecar, scheme: .legacy)
            // The timestamped scheme has its own window and is not judged by the body's time.
            let timestamped = try await sendSigned(stated(24 * 3600, "evt_ts_old_body"), to: sidecar, timestamp: now.seconds)
            #expect(replayed.status == 401)
            #expect(replayed.code == "STALE_TIMESTAMP")
            #expect(replayed.body.contains("de-duplication window"))
            #expect([edge.status, timeless.status, timestamped.status] == [Int](repeating: 200, count: 3))
            #expect(Set(try await receiver.waitFor(3).compactMap { $0.header("webhook-id") }) == ["evt_within", "evt_no_time", "evt_ts_old_body"])
            // Refused and logged, but not as Kora's lost webhook: anyone holding an old one could raise that alert.
            let metrics = try await get(sidecar.internalURL("/metrics")).body
            #expect(!metrics.contains("kora_sidecar_webhooks_signed_late_total 1"), "\(metrics)")
            #expect(metrics.contains(#"kora_sidecar_webhooks_total{result="STALE_TIMESTAMP"} 1"#), "\(metrics)")
            #expect(logs.all.contains { $0.contains("Webhook rejected") && $0.contains("older than webhooks.dedupWindowHours") })
        }
    }

    @Test func reportOnlyModeDeliversALegacyWebhookTooOldAsUnverified() async throws {
        let receiver = Receiver()
        let now = UnixTime(milliseconds: 1_795_000_000_000)
        var options = SidecarOptions()
        options.clock = { now }
        try await directSidecar(receiver: receiver, configure: { $0.webhooks.enforce = false }, options: options) {
            (sidecar: RunningSidecar) async throws in
            let body = TestEvent.body(eventID: "evt_old", at: UnixTime(milliseconds: now.milliseconds - 200 * 3_600_000))
            #expect(try await sendSigned(body, to: sidecar, scheme: .legacy).status == 200)
            #expect(try await receiver.waitFor(1).first?.header("X-Kora-Signature-Verified") == "false")
        }
    }

    @Test func toleranceHoldsAtExactlyThreeHundredSecondsOnTheWire() async throws {
        let now = UnixTime(milliseconds: 1_795_000_000_000)
        var options = SidecarOptions()
        options.clock = { now }
        try await directSidecar(receiver: Receiver(), options: options) { (sidecar: RunningSidecar) async throws in
            for (offset, status) in [(-300, 200), (300, 200), (-301, 401), (301, 401)] as [(Int64, Int)] {
                let answer = try await sendSigned(event(), to: sidecar, timestamp: now.seconds + offset)
                #expect(answer.status == status, "offset \(offset)")
            }
        }
    }

    @Test func verifiesTheExactRawBytes() async throws {
        let receiver = Receiver()
        try await directSidecar(receiver: receiver) { (sidecar: RunningSidecar) async throws in
            let pretty = Array(
                """
                {
                  "eventType" : "verification.completed",
                  "id" : "evt_pretty",
                  "data" : { "verificationId" : "ver_1", "decision" : "auto_approve" }
                }
                """.utf8)
            #expect(try await sendSigned(pretty, to: sidecar).status == 200)
            // The same content re-serialised (what JSON.stringify(req.body) does) no longer matches.
            let reordered = Array(#"{"id":"evt_pretty2","eventType":"verification.completed","data":{"decision":"auto_approve","verificationId":"ver_1"}}"#.utf8)
            let original = Array(#"{"eventType":"verification.completed","id":"evt_pretty2","data":{"verificationId":"ver_1","decision":"auto_approve"}}"#.utf8)
            let headers = KoraSignature.headers(scheme: .timestamped, secret: Secret(TestSecrets.webhook), body: original, timestamp: UnixTime.now().seconds)
            let answer = try await post(sidecar.webhookURL, body: reordered, headers: headers.map { ($0.name, $0.value) })
            #expect(answer.code == "INVALID_SIGNATURE")
            let delivered = try await receiver.waitFor(1)
            #expect(delivered[0].json?["data"] == ["verificationId": "ver_1", "decision": "auto_approve"])
        }
    }

    @Test func rotationAcceptsEveryConfiguredSecret() async throws {
        let receiver = Receiver()
        try await directSidecar(receiver: receiver, configure: { $0.webhooks.secrets = [Secret(TestSecrets.rotated), Secret(TestSecrets.webhook)] }) { (sidecar: RunningSidecar) async throws in
            #expect(try await sendSigned(event(), to: sidecar, secret: TestSecrets.webhook).status == 200)
            #expect(try await sendSigned(event(), to: sidecar, secret: TestSecrets.rotated, scheme: .legacy).status == 200)
            #expect(try await sendSigned(event(), to: sidecar, secret: "whsec_retired").status == 401)
            #expect(receiver.count == 2)
        }
    }

    @Test func answers413BeforeTheBodyIsRead() async throws {
        try await directSidecar(receiver: Receiver(), configure: { $0.webhooks.limits.maxBodyBytes = 1024 }) { (sidecar: RunningSidecar) async throws in
            let large = try await sendSigned(Array(repeating: UInt8(ascii: " "), count: 2048), to: sidecar)
            #expect(large.status == 413)
            #expect(large.code == "PAYLOAD_TOO_LARGE")

            // Announce 10 MB, send 100 bytes: the answer comes without the rest being sent.
            let connection = try RawConnection(port: sidecar.webhookPort)
            connection.send("POST /webhooks/koraidv HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\nX-Kora-Signature: 00\r\n\r\n")
            connection.send(Array(repeating: 0x20, count: 100))
            let response = await connection.response()
            #expect(statusCode(of: response) == 413)
            #expect(response.contains("PAYLOAD_TOO_LARGE"))
            #expect(await connection.closedByPeer())

            // A chunked body without a length is cut off as soon as it passes the limit.
            let chunked = try RawConnection(port: sidecar.webhookPort)
            chunked.send("POST /webhooks/koraidv HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nX-Kora-Signature: 00\r\n\r\n")
            chunked.send("800\r\n" + String(repeating: "a", count: 2048) + "\r\n")
            let chunkedResponse = await chunked.response()
            #expect(statusCode(of: chunkedResponse) == 413)

            // The listener still serves a valid webhook.
            #expect(try await sendSigned(event(), to: sidecar).status == 200)
        }
    }

    @Test func aBodyThatNeverEndsIsCutOff() async throws {
        try await directSidecar(receiver: Receiver(), configure: { $0.webhooks.limits.readTimeoutSeconds = Sanitizer.slowdown }) { (sidecar: RunningSidecar) async throws in
            let connection = try RawConnection(port: sidecar.webhookPort, readTimeout: 20)
            connection.send("POST /webhooks/koraidv HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{\"eventType\":")
            #expect(await connection.closedByPeer())
            #expect(try await sendSigned(event(), to: sidecar).status == 200)
        }
    }

    @Test func headersSentSlowlyAreCutOff() async throws {
        try await directSidecar(receiver: Receiver(), configure: { $0.webhooks.limits.readTimeoutSeconds = Sanitizer.slowdown }) { (sidecar: RunningSidecar) async throws in
            let slow = try RawConnection(port: sidecar.webhookPort, readTimeout: 20)
            slow.send("POST /webhooks/koraidv HTTP/1.1\r\nHost: x\r\n")
            #expect(await slow.closedByPeer())
            let idle = try RawConnection(port: sidecar.webhookPort, readTimeout: 20)
            #expect(await idle.closedByPeer())
            #expect(try await sendSigned(TestEvent.body(), to: sidecar).status == 200)
        }
    }

    @Test func signedButUnparseablePayloadsAreQuarantined() async throws {
        let store = InMemoryStore()
        let receiver = Receiver()
        try await directSidecar(receiver: receiver, store: store) { (sidecar: RunningSidecar) async throws in
            for body in ["[1,2,3]", "", "{\"data\":{}}", "\u{00}\u{FF}binary"] {
                let answer = try await sendSigned(Array(body.utf8), to: sidecar)
                #expect(answer.status == 400)
                #expect(answer.code == "INVALID_PAYLOAD")
            }
            let quarantined = try await store.quarantined(limit: 10)
            #expect(quarantined.count == 4)
            #expect(quarantined.last?.body == Array("[1,2,3]".utf8))
            #expect(quarantined.last?.headers["X-Signature"] != nil)
            // An unsigned one is refused before parsing and never kept.
            #expect(try await post(sidecar.webhookURL, body: Array("[]".utf8), headers: []).status == 401)
            #expect(try await store.quarantined(limit: 10).count == 4)
            #expect(receiver.count == 0)
        }
    }

    @Test func directModeAnswers503UntilEveryServiceTookTheEvent() async throws {
        let receiver = Receiver { _, index in index == 0 ? .internalServerError : .ok }
        try await directSidecar(receiver: receiver) { (sidecar: RunningSidecar) async throws in
            let body = event("evt_retry")
            let refused = try await sendSigned(body, to: sidecar)
            #expect(refused.status == 503)
            #expect(refused.code == "UNAVAILABLE")
            // Kora retries: the retry is delivered, not dropped as a duplicate.
            #expect(try await sendSigned(body, to: sidecar).json == ["received": true])
            #expect(try await sendSigned(body, to: sidecar).json == ["received": true, "duplicate": true])
            #expect(receiver.count == 2)
        }
    }

    @Test func queuedModeAnswers503WhenTheStoreFails() async throws {
        let store = InMemoryStore()
        try await directSidecar(receiver: Receiver(), store: store, configure: { $0.delivery.mode = .queued }) { (sidecar: RunningSidecar) async throws in
            store.failWrites(with: SQLiteError(code: 13, message: "database or disk is full"))
            let answer = try await sendSigned(event("evt_full"), to: sidecar)
            #expect(answer.status == 503)
            #expect(answer.code == "UNAVAILABLE")
            #expect(try await get(sidecar.internalURL("/metrics")).body.contains(#"kora_sidecar_webhooks_total{result="UNAVAILABLE",reason="store"} 1"#))
            let ready = try await get(sidecar.internalURL("/readyz"))
            #expect(ready.status == 503)
            #expect(ready.json?["reason"]?.text?.contains("store") == true)
            store.failWrites(with: nil)
            #expect(try await sendSigned(event("evt_full"), to: sidecar).json == ["received": true])
            #expect(try await get(sidecar.internalURL("/readyz")).status == 200)
        }
    }

    @Test func thePublicListenerServesNothingElse() async throws {
        try await directSidecar(receiver: Receiver()) { (sidecar: RunningSidecar) async throws in
            let wrongMethod = try await get(sidecar.webhookURL)
            #expect(wrongMethod.status == 405)
            #expect(wrongMethod.code == "METHOD_NOT_ALLOWED")
            #expect(try await get(sidecar.webhookBase("/healthz")).json == ["status": "ok"])
            for path in ["/", "/readyz", "/metrics", "/admin/deliveries", "/api/v1/idv/verifications", "/webhooks/koraidv/x"] {
                let answer = try await get(sidecar.webhookBase(path))
                #expect(answer.status == 404, "\(path)")
                #expect(answer.code == "NOT_FOUND")
            }
            #expect(try await post(sidecar.webhookBase("/healthz"), body: [], headers: []).status == 405)
        }
    }

    @Test func reportOnlyModeDeliversUnverifiedEventsMarked() async throws {
        let receiver = Receiver()
        try await directSidecar(receiver: receiver, configure: { $0.webhooks.enforce = false }) { (sidecar: RunningSidecar) async throws in
            #expect(try await post(sidecar.webhookURL, body: event("evt_unsigned"), headers: []).status == 200)
            #expect(try await sendSigned(event("evt_signed"), to: sidecar).status == 200)
            let delivered = try await receiver.waitFor(2)
            let byID = Dictionary(uniqueKeysWithValues: delivered.map { ($0.header("webhook-id") ?? "", $0) })
            #expect(byID["evt_unsigned"]?.header("X-Kora-Signature-Verified") == "false")
            #expect(byID["evt_signed"]?.header("X-Kora-Signature-Verified") == "true")
        }
    }

    @Test func reportOnlyModeLetsNoUnverifiedEventMakeKorasSignedOneADuplicate() async throws {
        let receiver = Receiver()
        try await directSidecar(receiver: receiver, configure: { $0.webhooks.enforce = false }) { (sidecar: RunningSidecar) async throws in
            let forged = TestEvent.body(type: "verification.verified", eventID: "evt_contested")
            let genuine = TestEvent.body(type: "verification.rejected", decision: "auto_reject", eventID: "evt_contested")
            #expect(try await post(sidecar.webhookURL, body: forged, headers: []).status == 200)
            let signed = try await sendSigned(genuine, to: sidecar)
            #expect(signed.json == ["received": true])
            let delivered = try await receiver.waitFor(2)
            #expect(delivered.map { $0.header("X-Kora-Signature-Verified") } == ["false", "true"])
            #expect(delivered.last?.json?["type"]?.text == "verification.rejected")
            // Kora's copy of an event already taken is still a duplicate, and so is a forgery's.
            #expect(try await sendSigned(genuine, to: sidecar).json == ["received": true, "duplicate": true])
            #expect(try await post(sidecar.webhookURL, body: forged, headers: []).json == ["received": true, "duplicate": true])
        }
    }

    @Test func theOriginalFormatRestatesKorasUnsignedHeadersFromTheSignedBody() async throws {
        let receiver = Receiver()
        try await directSidecar(receiver: receiver, configure: { $0.services[0].deliver?.format = .original }) { (sidecar: RunningSidecar) async throws in
            let body = TestEvent.body(type: "verification.rejected", decision: "auto_reject", eventID: "evt_real")
            // X-Webhook-ID and X-Event-Type are outside the signature: anyone holding the webhook can change them.
            let headers = KoraSignature.headers(scheme: .timestamped, secret: Secret(TestSecrets.webhook), body: body, timestamp: UnixTime.now().seconds)
            let altered = headers.map { ($0.name, $0.value) } + [("X-Webhook-ID", "evt_other"), ("X-Event-Type", "verification.verified")]
            #expect(try await post(sidecar.webhookURL, body: body, headers: altered).status == 200)
            let delivered = try await receiver.waitFor(1)[0]
            #expect(delivered.header("X-Event-Type") == "verification.rejected")
            #expect(delivered.header("X-Webhook-ID") == "evt_real")
            #expect(delivered.header("X-Signature") == headers[0].value)
            #expect(delivered.body == body)
        }
    }

    @Test func malformedRequestsNeverCrashOrAnswer500() async throws {
        try await directSidecar(receiver: Receiver()) { (sidecar: RunningSidecar) async throws in
            let hugeHeader = try RawConnection(port: sidecar.webhookPort)
            hugeHeader.send("POST /webhooks/koraidv HTTP/1.1\r\nHost: x\r\nX-Big: \(String(repeating: "a", count: 40_000))\r\nContent-Length: 0\r\n\r\n")
            let hugeStatus = statusCode(of: await hugeHeader.response())
            #expect(hugeStatus.map { (400..<500).contains($0) } ?? true)

            let garbage = try RawConnection(port: sidecar.webhookPort)
            garbage.send([0x16, 0x03, 0x01, 0x00, 0xFF] + Array(repeating: 0x00, count: 64))
            #expect(statusCode(of: await garbage.response()).map { $0 < 500 } ?? true)

            let binary = try await post(sidecar.webhookURL, body: (0..<255).map { UInt8($0) }, headers: [("X-Kora-Signature", "zz")])
            #expect(binary.status == 401)
            #expect(try await sendSigned(event(), to: sidecar).status == 200)
        }
    }

    @Test func logsOneLinePerWebhookAndNoSecret() async throws {
        let logs = TestLogs()
        try await directSidecar(receiver: Receiver(), logs: logs) { (sidecar: RunningSidecar) async throws in
            _ = try await sendSigned(event("evt_logged"), to: sidecar)
            _ = try await sendSigned(event("evt_bad"), to: sidecar, secret: "whsec_wrong")
            _ = try await sendSigned(Array("[]".utf8), to: sidecar)
        }
        let lines = logs.all
        #expect(lines.filter { $0.contains("Webhook accepted") && $0.contains("evt_logged") }.count == 1)
        #expect(lines.filter { $0.contains("INVALID_SIGNATURE") }.count == 1)
        #expect(lines.filter { $0.contains("quarantined") }.count == 1)
        for line in lines {
            #expect(!line.contains(TestSecrets.webhook))
            #expect(!line.contains(TestSecrets.signing))
            #expect(!line.contains("token-app"))
        }
    }
}

@Suite("Replays and hostile ids")
struct ReplayTests {
    func sidecar(receiver: Receiver, mode: DeliveryMode, _ body: @escaping @Sendable (RunningSidecar) async throws -> Void) async throws {
        try await withReceiver(receiver) { (port: Int) async throws in
            let configuration = testConfiguration(services: [testService("app", target: .url("http://127.0.0.1:\(port)/e"))], mode: mode)
            var options = SidecarOptions()
            options.store = InMemoryStore()
            try await withSidecar(configuration, options: options, body)
        }
    }

    @Test(arguments: [DeliveryMode.queued, .direct])
    func aBodyWithoutIdReplayedUnderANewHeaderIdIsADuplicate(mode: DeliveryMode) async throws {
        let receiver = Receiver()
        try await sidecar(receiver: receiver, mode: mode) { (sidecar: RunningSidecar) async throws in
            let body = Array(#"{"eventType":"verification.completed","data":{"verificationId":"ver_1","decision":"auto_approve"}}"#.utf8)
            let first = try await sendSigned(body, to: sidecar, scheme: .legacy, extra: [("X-Webhook-ID", "evt_a")])
            #expect(first.json == ["received": true])
            let replay = try await sendSigned(body, to: sidecar, scheme: .legacy, extra: [("X-Webhook-ID", "evt_b")])
            #expect(replay.json == ["received": true, "duplicate": true])
            _ = try await receiver.waitFor(1)
            #expect(receiver.deliveries.map { $0.header("webhook-id") } == ["evt_a"])
        }
    }

    /// Kora's two copies of an event arrive together: the second waits for Kora's retry. So do copies
    /// that tell themselves apart only by an unsigned X-Webhook-ID (a body without id): only the
    /// event's id used to be held in flight, and those went out twice.
    @Test(arguments: [true, false])
    func korasTwoSimultaneousCopiesAreDeliveredOnceInDirectMode(bodyNamesItsID: Bool) async throws {
        let gate = Gate()
        let receiver = Receiver.held(by: gate)
        try await sidecar(receiver: receiver, mode: .direct) { (sidecar: RunningSidecar) async throws in
            let body =
                bodyNamesItsID
                ? TestEvent.body(eventID: "evt_twice")
                : Array(#"{"eventType":"verification.completed","data":{"verificationId":"ver_1","decision":"auto_approve"}}"#.utf8)
            @Sendable func send(copy: String) async throws -> WebhookAnswer {
                bodyNamesItsID
                    ? try await sendSigned(body, to: sidecar) : try await sendSigned(body, to: sidecar, scheme: .legacy, extra: [("X-Webhook-ID", copy)])
            }
            async let first = send(copy: "evt_a")
            _ = try await receiver.waitFor(1)
            let second = try await send(copy: "evt_b")
            #expect(second.status == 503)
            gate.open()
            #expect(try await first.status == 200)
            #expect(try await send(copy: "evt_c").json == ["received": true, "duplicate": true])
            #expect(receiver.count == 1)
        }
    }

    @Test func idsThatCannotBeHeadersFallBackToTheDigest() throws {
        for id in ["", "evt\r\nX-Injected: 1", String(repeating: "a", count: 300), "évt"] {
            let body = JSONWriter.encode(["id": .string(id), "eventType": "verification.completed", "data": [:]])
            let event = try EventNormalizer.normalize(body: body, webhookID: nil, receivedAt: .now())
            #expect(event.id.hasPrefix("sha256:"))
        }
        let badType = JSONWriter.encode(["eventType": "verification.completed\r\nX: 1", "data": [:]])
        #expect(throws: InvalidPayload.self) { try EventNormalizer.normalize(body: badType, webhookID: nil, receivedAt: .now()) }
    }
}
