import Foundation
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

/// Identity data minimised per service (`deliver.redact`): a service that needs only the outcome
/// never receives the rest.
@Suite("Redaction")
struct RedactionTests {
    static let body = Array(
        #"""
        {"id":"evt_redact","eventType":"verification.completed","resourceType":"verification","resourceId":"ver_r",
         "timestamp":"2026-11-30T09:00:00Z",
         "data":{"verificationId":"ver_r","externalId":"marker-user-7731","status":"verified","decision":"auto_approve",
                 "metadata":{"email":"marker-7731@example.com"},"scores":{"face":0.97,"document":0.91}}}
        """#.utf8)

    @Test func aServiceWithRedactReceivesTheEventWithoutThosePathsAndStillSigned() async throws {
        let receiver = Receiver()
        try await withReceiver(receiver) { (port: Int) async throws in
            let full = testService("full", target: .url("http://127.0.0.1:\(port)/full"))
            var minimal = testService("minimal", target: .url("http://127.0.0.1:\(port)/minimal"))
            minimal.deliver?.redact = ["data.metadata", "data.scores.*", "verification.externalId", "data.externalId"].compactMap(RedactionPath.init)
            var options = SidecarOptions()
            options.store = InMemoryStore()
            try await withSidecar(testConfiguration(services: [full, minimal], mode: .queued), options: options) { sidecar in
                #expect(try await sendSigned(Self.body, to: sidecar).status == 200)
                let deliveries = try await receiver.waitFor(2)
                let redacted = try #require(deliveries.first { $0.path == "/minimal" })
                let whole = try #require(deliveries.first { $0.path == "/full" })
                let text = String(decoding: redacted.body, as: UTF8.self)
                #expect(!text.contains("marker"), "\(text)")
                #expect(redacted.json?["data"]?["scores"] == .object([]))
                #expect(redacted.json?["verification"]?["outcome"] == "approved")
                #expect(redacted.json?["verification"]?["externalId"] == nil)
                #expect(String(decoding: whole.body, as: UTF8.self).contains("marker-7731@example.com"))
                // The signature is over what the service received.
                let check = try verifyWithReferenceLibrary(secret: TestSecrets.signing, delivery: redacted)
                #expect(check.ok, "\(check.output)")
            }
        }
    }

    @Test func redactIsRefusedWithTheOriginalFormatAndForMalformedPaths() throws {
        let text = #"""
            {"webhooks": {"secrets": ["whsec_x"]}, "services": [
              {"name": "a", "token": "t", "deliver": {"url": "http://h/e", "format": "original", "redact": ["data.metadata"]}},
              {"name": "b", "deliver": {"url": "http://h/e", "redact": ["data..x", 3]}}]}
            """#
        let error = try #require(throws: ConfigurationError.self) {
            try SidecarConfiguration.load(bytes: Array(text.utf8), source: "test", environment: [:])
        }
        let paths = error.problems.map(\.path)
        #expect(paths.contains("$.services[0].deliver.redact"))
        #expect(paths.contains("$.services[1].deliver.redact[0]"))
        #expect(paths.contains("$.services[1].deliver.redact[1]"))
        #expect(error.description.contains("format original"))
    }

    @Test func removingFollowsWildcardsAndIgnoresWhatIsNotThere() throws {
        let value = try JSONParser.parse(Array(#"{"a":{"b":1,"c":{"d":2,"e":3}},"f":[1]}"#.utf8))
        let paths = ["a.c.*", "a.x.y", "f.g", "z"].compactMap(RedactionPath.init)
        #expect(String(decoding: JSONWriter.encode(value.removing(paths)), as: UTF8.self) == #"{"a":{"b":1,"c":{}},"f":[1]}"#)
        #expect(RedactionPath("") == nil)
        #expect(RedactionPath(".a") == nil)
    }
}
