import Foundation
import NIOHTTP1
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

/// `kora-sidecar simulate`: the Kora stand-in our own tests and other teams use (KORA.md).
@Suite struct SimulatorTests {
    static let key = "sk_sandbox_simulator_test"

    func kora(_ base: String, key: String? = SimulatorTests.key) -> SDKStyleClient {
        SDKStyleClient(baseURL: base, apiKey: key, tenantID: "tenant-sim")
    }

    @Test func healthIsOpenButTheAPINeedsABearerKey() async throws {
        try await withSimulator({ $0.apiKeys = [Self.key] }) { _, base in
            #expect(try await request(.GET, base + "/health").status == 200)
            for key in [nil, "sk_sandbox_wrong"] {
                let answer = try await kora(base, key: key).call(.GET, "/verifications/ver_1")
                #expect(answer.status == 401)
                #expect(answer.code == "UNAUTHORIZED")
                #expect(answer.json?["error"]?.text?.isEmpty == false)
            }
            let withoutTenant = try await request(.GET, base + "/alerts", headers: [("Authorization", "Bearer \(Self.key)")])
            #expect(withoutTenant.status == 400)
            #expect(withoutTenant.code == "MISSING_TENANT_ID")
        }
    }

    @Test func createValidatesLikeKora() async throws {
        try await withSimulator { _, base in
            let missing = try await kora(base).call(.POST, "/verifications", json: ["tier": "basic"])
            #expect(missing.status == 400)
            #expect(missing.json?["message"]?.text == "Validation failed")
            #expect(missing.json?["errors"] == [["field": "externalId", "message": "externalId is required"]])
            let tier = try await kora(base).call(.POST, "/verifications", json: ["externalId": "u", "tier": "platinum"])
            #expect(tier.status == 400)
            // A port no socket can have: the stand-in's HTTP client would trap on it when it sends the webhook.
            let port = try await kora(base).call(.POST, "/verifications", json: ["externalId": "u", "callbackUrl": "http://127.0.0.1:99999/cb"])
            #expect(port.status == 400)
            #expect(port.json?["errors"] == [["field": "callbackUrl", "message": "callbackUrl must have a port from 1 to 65535, not 99999"]])
            let unknown = try await kora(base).call(.GET, "/verifications/ver_missing")
            #expect(unknown.status == 404)
            #expect(unknown.code == "NOT_FOUND")
        }
    }

    @Test(arguments: SandboxOutcome.allCases)
    func eachPrefixDecidesItsOutcomeAndSignsWebhooksToBothURLs(_ outcome: SandboxOutcome) async throws {
        let callback = Receiver()
        let dashboard = Receiver()
        try await withReceiver(callback) { callbackPort in
            try await withReceiver(dashboard) { dashboardPort in
                try await withSimulator({
                    $0.webhookURL = "http://127.0.0.1:\(dashboardPort)/dashboard"
                    // The expiry starts once `verification.completed` was sent to both URLs, whatever its delay.
                    // The slow outcome's decision waits an hour: the test looks, then decides it itself.
                    $0.slowDelay = .seconds(3600)
                    $0.expiryDelay = .milliseconds(100 * Sanitizer.slowdown)
                }) { simulator, base in
                    let client = kora(base)
                    let created = try await client.createVerification(
                        externalID: outcome.prefix + "user-1", extra: [JSONMember("callbackUrl", .string("http://127.0.0.1:\(callbackPort)/cb"))])
                    #expect(created.status == 201)
                    #expect(created.json?["status"]?.text == "pending")
                    let id = try #require(created.json?["id"]?.text)
                    let image: JSONValue = ["imageBase64": .string(Data("fake image".utf8).base64EncodedString())]
                    for path in ["document", "document/back", "selfie"] {
                        #expect(try await client.call(.POST, "/verifications/\(id)/\(path)", json: image).status == 200)
                    }
                    #expect(try await client.call(.POST, "/verifications/\(id)/liveness/session").status == 201)
                    #expect(try await client.call(.POST, "/verifications/\(id)/liveness/frames", json: ["frames": ["a", "b"]]).status == 200)
                    #expect(simulator.uploads(of: id).keys.sorted() == ["document", "document/back", "liveness/frames", "selfie"])

                    let completed = try await client.call(.POST, "/verifications/\(id)/complete")
                    #expect(completed.status == 200)
                    let expected = Self.expected[outcome]!
                    if outcome == .slow {
                        #expect(completed.json?["status"]?.text == "processing")
                        let sentSoFar = await simulator.sent.all
                        #expect(sentSoFar.isEmpty)
                        #expect(try await client.call(.GET, "/verifications/\(id)").json?["status"]?.text == "processing")
                        // The hour is up: what the worker does when the slow delay ends.
                        simulator.perform(.decide, id: id).forEach(simulator.schedule)
                    } else {
                        #expect(completed.json?["status"]?.text == expected.status)
                    }
                    let count = expected.events.count
                    let fromCallback = try await callback.waitFor(count)
                    let fromDashboard = try await dashboard.waitFor(count)
                    // One verification's events go out one after the other: each URL gets them in order.
                    #expect(fromCallback.map { $0.header("X-Event-Type") } == expected.events)
                    #expect(fromDashboard.map { $0.header("X-Event-Type") } == expected.events)
                    #expect(fromCallback.map { $0.header("X-Webhook-ID") } == fromDashboard.map { $0.header("X-Webhook-ID") })
                    // The integration guide's handlers read the decision from `verification.completed`.
                    let completion = fromCallback.first { $0.header("X-Event-Type") == "verification.completed" }
                    #expect(completion?.json?["data"]?["decision"]?.text == expected.decision)
                    #expect(completion?.json?["data"]?["verificationId"]?.text == id)
                    let verifier = SignatureVerifier(secrets: [Secret(TestSecrets.webhook)], schemes: [.timestamped], toleranceSeconds: 300)
                    for delivery in fromCallback + fromDashboard {
                        let headers = SignatureHeaders(
                            signature: delivery.header("X-Signature"), timestamp: delivery.header("X-Timestamp"),
                            algorithm: delivery.header("X-Signature-Algorithm"))
                        #expect(verifier.verify(body: delivery.body, headers: headers, now: UnixTime.now().seconds) == .success(.timestamped))
                        #expect(delivery.json?["id"]?.text == delivery.header("X-Webhook-ID"))
                        #expect(delivery.json?["tenantId"]?.text == "tenant-sim")
                    }
                    let final = try await client.call(.GET, "/verifications/\(id)")
                    #expect(final.json?["status"]?.text == expected.finalStatus)
                    #expect(fromCallback.last?.json?["data"]?["status"]?.text == expected.finalStatus)
                }
            }
        }
    }

    static let expected: [SandboxOutcome: (status: String, finalStatus: String, decision: String, events: [String])] = [
        .approve: ("verified", "verified", "auto_approve", ["verification.completed", "verification.verified"]),
        .reject: ("rejected", "rejected", "auto_reject", ["verification.completed", "verification.rejected"]),
        .review: ("manual_review", "manual_review", "manual_review", ["verification.completed"]),
        .fraud: ("rejected", "rejected", "auto_reject", ["fraud_alert.created", "verification.completed", "verification.rejected"]),
        .expired: ("verified", "expired", "auto_approve", ["verification.completed", "verification.verified", "verification.expired"]),
        .slow: ("verified", "verified", "auto_approve", ["verification.completed", "verification.verified"]),
    ]

    @Test func slowSandboxWaitsTenSecondsUnlessConfigured() {
        #expect(SimulatorConfiguration(webhookSecret: Secret("s")).slowDelay == .seconds(10))
        #expect(SandboxOutcome(externalID: "test-slow-1") == .slow)
        #expect(SandboxOutcome(externalID: "someone") == .approve)
    }

    @Test func fraudRaisesAnAlertThatCanBeResolved() async throws {
        try await withSimulator { _, base in
            let client = kora(base)
            let id = try #require(try await client.createVerification(externalID: "test-fraud-9").json?["id"]?.text)
            _ = try await client.call(.POST, "/verifications/\(id)/complete")
            let open = try await client.call(.GET, "/alerts?status=open")
            guard case .array(let alerts)? = open.json?["alerts"], let alert = alerts.first else { throw TimedOut(what: "an alert") }
            #expect(alerts.count == 1)
            #expect(alert["verificationId"]?.text == id)
            #expect(alert["severity"]?.text == "high")
            let alertID = try #require(alert["id"]?.text)
            let resolved = try await client.call(.POST, "/alerts/\(alertID)/resolve", json: ["resolution": "confirmed_fraud", "notes": "n"])
            #expect(resolved.json?["status"]?.text == "resolved")
            let stillOpen = try await client.call(.GET, "/alerts?status=open")
            #expect(stillOpen.json?["alerts"] == .array([]))
            #expect(try await client.call(.POST, "/alerts/alert_nope/resolve", json: [:]).status == 404)
        }
    }

    @Test(arguments: ["approve", "reject"])
    func manualReviewDecidesAReviewVerification(_ decision: String) async throws {
        let (status, outcome) = decision == "approve" ? ("verified", "approved") : ("rejected", "rejected")
        let dashboard = Receiver()
        try await withReceiver(dashboard) { port in
            try await withSimulator({ $0.webhookURL = "http://127.0.0.1:\(port)/hooks" }) { _, base in
                let client = kora(base)
                let id = try #require(try await client.createVerification(externalID: "test-review-3").json?["id"]?.text)
                let early = try await client.call(.POST, "/verifications/\(id)/review", json: ["decision": "approve"], headers: [("X-Reviewer-ID", "rev-1")])
                #expect(early.status == 409)
                #expect(early.code == "INVALID_STATE")
                _ = try await client.call(.POST, "/verifications/\(id)/complete")
                // A reviewer decides after the completion arrived (its send and the review's are separate jobs).
                _ = try await dashboard.waitFor(1)
                let noReviewer = try await client.call(.POST, "/verifications/\(id)/review", json: ["decision": "approve"])
                #expect(noReviewer.status == 400)
                let badDecision = try await client.call(.POST, "/verifications/\(id)/review", json: ["decision": "maybe"], headers: [("X-Reviewer-ID", "rev-1")])
                #expect(badDecision.status == 400)
                let reviewed = try await client.call(
                    .POST, "/verifications/\(id)/review", json: ["decision": .string(decision)], headers: [("X-Reviewer-ID", "rev-1")])
                #expect(reviewed.json?["status"]?.text == status)
                // Completing sends the manual_review decision; the reviewer's decision comes as its own event.
                let events = try await dashboard.waitFor(2)
                #expect(events.map { $0.header("X-Event-Type") } == ["verification.completed", "verification." + status])
                #expect(events[0].json?["data"]?["decision"]?.text == "manual_review")
                #expect(events[1].json?["data"]?["decision"]?.text == decision)
                let normalized = try EventNormalizer.normalize(
                    body: events[1].body, webhookID: nil, receivedAt: .now(), signatureVerified: true, originalHeaders: [])
                let body = try JSONParser.parse(normalized.normalizedBody)
                #expect(body["verification"]?["outcome"]?.text == outcome)
            }
        }
    }

    @Test func autoCompleteDecidesWithoutACall() async throws {
        let dashboard = Receiver()
        try await withReceiver(dashboard) { port in
            try await withSimulator({
                $0.webhookURL = "http://127.0.0.1:\(port)/hooks"
                $0.autoComplete = .milliseconds(50)
            }) { simulator, base in
                let id = try #require(try await kora(base).createVerification(externalID: "test-reject-auto").json?["id"]?.text)
                let events = try await dashboard.waitFor(2)
                #expect(events.map { $0.header("X-Event-Type") } == ["verification.completed", "verification.rejected"])
                #expect(simulator.verification(id)?["status"]?.text == "rejected")
                #expect(try await kora(base).call(.POST, "/verifications/\(id)/complete").status == 409)
            }
        }
    }

    @Test func rateLimitAnswers429WithKorasHeadersAndBody() async throws {
        let clock = ManualClock()
        try await withSimulator({
            $0.rateLimitPerMinute = 2
            $0.clock = { clock.read() }
        }) { _, base in
            let client = kora(base)
            let first = try await client.call(.GET, "/document-types?country=DE")
            #expect(first.status == 200)
            #expect(first.header("X-RateLimit-Limit") == "2")
            #expect(first.header("X-RateLimit-Remaining") == "1")
            let reset = try #require(first.header("X-RateLimit-Reset").flatMap { Int64($0) })
            #expect(reset > clock.read().seconds && reset <= clock.read().seconds + 60)
            let unauthorized = try await kora(base, key: nil).call(.GET, "/alerts")
            #expect(unauthorized.status == 401)
            #expect(unauthorized.header("X-RateLimit-Remaining") == "0")
            let limited = try await client.call(.GET, "/alerts")
            #expect(limited.status == 429)
            let retryAfter = reset - clock.read().seconds
            #expect(limited.header("Retry-After") == String(retryAfter))
            #expect(
                limited.body
                    == #"{"code":"RATE_LIMIT_EXCEEDED","error":"Rate limit exceeded. Please retry after the reset time.","details":{"retryAfter":"#
                    + String(retryAfter) + "}}")
            #expect(try await request(.GET, base + "/health").status == 200)
            clock.advance(.seconds(retryAfter))
            #expect(try await client.call(.GET, "/alerts").status == 200)
        }
    }

    @Test func everyAnswerCarriesTheRateLimitHeadersWithoutALimitConfigured() async throws {
        let clock = ManualClock()
        try await withSimulator({ $0.clock = { clock.read() } }) { _, base in
            let client = kora(base)
            var answers: [HTTPAnswer] = []
            answers.append(try await client.createVerification(externalID: "test-approve-headers"))
            answers.append(try await client.call(.GET, "/verifications/ver_missing"))
            answers.append(try await client.call(.POST, "/verifications", json: ["tier": "basic"]))
            answers.append(try await kora(base, key: nil).call(.GET, "/alerts"))
            answers.append(try await client.call(.GET, "/document-types?country=DE"))
            #expect(answers.map(\.status) == [201, 404, 400, 401, 200])
            // Far above Kora's plans, so that nothing is refused or held back in practice, and true:
            // the stand-in counts every call against it, in the calendar minute.
            let limit = SimulatorConfiguration.generousRateLimit
            #expect(limit == 100_000)
            for (index, answer) in answers.enumerated() {
                #expect(answer.header("X-RateLimit-Limit") == String(limit))
                #expect(answer.header("X-RateLimit-Remaining") == String(limit - index - 1))
                #expect(answer.header("X-RateLimit-Reset") == String(clock.read().seconds + 60))
            }
            // /health carries no key, so no key's budget.
            #expect(try await request(.GET, base + "/health").header("X-RateLimit-Limit") == nil)
        }
    }

    @Test func imagesAreSignedURLsToTheStandInValidForFifteenMinutes() async throws {
        let clock = ManualClock()
        try await withSimulator({ $0.clock = { clock.read() } }) { _, base in
            let client = kora(base)
            let id = try #require(try await client.createVerification(externalID: "test-approve-images").json?["id"]?.text)
            let image: JSONValue = ["imageBase64": .string(Data("fake image".utf8).base64EncodedString())]
            for path in ["selfie", "document"] {
                #expect(try await client.call(.POST, "/verifications/\(id)/\(path)", json: image).status == 200)
            }
            let expiresAt = clock.read().adding(.seconds(15 * 60)).iso8601Seconds
            let list = try await client.call(.GET, "/verifications/\(id)/images")
            #expect(list.status == 200)
            #expect(list.header("X-RateLimit-Limit") != nil)
            #expect(list.json?["verificationId"]?.text == id)
            guard case .array(let images)? = list.json?["images"] else { throw TimedOut(what: "a list of images") }
            #expect(images.map { $0["type"]?.text } == ["document", "selfie"])
            #expect(images.allSatisfy { $0["expiresAt"]?.text == expiresAt })

            let one = try await client.call(.GET, "/verifications/\(id)/images/selfie")
            #expect(one.status == 200)
            #expect(one.json?["verificationId"]?.text == id)
            #expect(one.json?["type"]?.text == "selfie")
            #expect(one.json?["expiresAt"]?.text == expiresAt)
            let url = try #require(one.json?["url"]?.text)
            let host = String(base.dropLast("/api/v1/idv".count))
            #expect(url.hasPrefix(host + "/signed/images/\(id)/selfie?expires="))
            // A signed URL needs no API key, and serves an image while it is valid.
            let fetched = try await request(.GET, url)
            #expect(fetched.status == 200)
            #expect(fetched.header("Content-Type") == "image/png")
            #expect(fetched.bytes.starts(with: [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]))
            #expect(try await request(.GET, url.replacingOccurrences(of: "/selfie?", with: "/document?")).status == 403)
            clock.advance(.seconds(15 * 60 - 1))
            #expect(try await request(.GET, url).status == 200)
            clock.advance(.seconds(1))
            #expect(try await request(.GET, url).status == 403)

            let missing = try await client.call(.GET, "/verifications/\(id)/images/document_back")
            #expect(missing.status == 404)
            #expect(missing.code == "NOT_FOUND")
            let unknown = try await client.call(.GET, "/verifications/ver_missing/images")
            #expect(unknown.status == 404)
            #expect(unknown.code == "NOT_FOUND")
            #expect(try await client.call(.GET, "/verifications/ver_missing/images/selfie").status == 404)
            #expect(try await kora(base, key: nil).call(.GET, "/verifications/\(id)/images").status == 401)
        }
    }

    @Test func theComplianceReportIsAValidPDFLargeEnoughToBeStreamed() async throws {
        try await withSimulator { _, base in
            let client = kora(base)
            let id = try #require(try await client.createVerification(externalID: "test-reject-(pdf)\\").json?["id"]?.text)
            #expect(try await client.call(.POST, "/verifications/\(id)/complete").status == 200)
            let report = try await client.call(.GET, "/verifications/\(id)/report")
            #expect(report.status == 200)
            #expect(report.header("Content-Type") == "application/pdf")
            #expect(report.header("Content-Disposition") == "attachment; filename=\"\(id)-report.pdf\"")
            #expect(report.header("X-RateLimit-Limit") != nil)
            // Over the size up to which the sidecar's proxy reads an answer whole.
            #expect(report.bytes.count > ProxyAnswer.bufferedAnswerBytes)
            let bytes = report.bytes
            #expect(bytes.starts(with: Array("%PDF-1.4\n".utf8)))
            #expect(bytes.suffix(6) == ArraySlice("%%EOF\n".utf8))
            // The cross-reference table a PDF reader starts from points at every object.
            let tail = String(decoding: bytes.suffix(200), as: UTF8.self)
            let startxref = try #require(tail.components(separatedBy: "startxref\n").last?.split(separator: "\n").first.flatMap { Int($0) })
            let table = String(decoding: bytes[startxref...], as: UTF8.self)
            #expect(table.hasPrefix("xref\n0 7\n0000000000 65535 f \n"))
            let offsets = table.split(separator: "\n").dropFirst(3).prefix(6).compactMap { Int($0.prefix(10)) }
            #expect(offsets.count == 6)
            for (index, offset) in offsets.enumerated() {
                #expect(bytes[offset...].starts(with: Array("\(index + 1) 0 obj\n".utf8)), "object \(index + 1)")
            }
            let text = String(decoding: bytes, as: UTF8.self)
            #expect(text.contains("(Decision: auto_reject) '"))
            #expect(text.contains("(External id: test-reject-\\(pdf\\)\\\\) '"))
            // The same verification gives the same bytes.
            #expect(try await client.call(.GET, "/verifications/\(id)/report").bytes == bytes)
            let unknown = try await client.call(.GET, "/verifications/ver_missing/report")
            #expect(unknown.status == 404)
            #expect(unknown.code == "NOT_FOUND")
        }
    }

    @Test func uploadsAreBoundedAndNeedAnImage() async throws {
        try await withSimulator({ $0.maxBodyBytes = 1000 }) { _, base in
            let client = kora(base)
            let id = try #require(try await client.createVerification(externalID: "u").json?["id"]?.text)
            let tooLarge = try await client.call(.POST, "/verifications/\(id)/selfie", json: ["imageBase64": .string(String(repeating: "A", count: 2000))])
            #expect(tooLarge.status == 413)
            let noImage = try await client.call(.POST, "/verifications/\(id)/document", json: ["side": "front"])
            #expect(noImage.status == 400)
            #expect(noImage.json?["errors"]?.text == nil && noImage.json?["message"]?.text == "Validation failed")
        }
    }
}
