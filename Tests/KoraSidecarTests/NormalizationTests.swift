import Crypto
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

@Suite("Normalisation")
struct NormalizationTests {
    let receivedAt = UnixTime(milliseconds: 1_795_000_000_123)

    func normalize(_ text: String, webhookID: String? = nil) throws -> (event: KoraEvent, json: JSONValue) {
        let event = try EventNormalizer.normalize(body: Array(text.utf8), webhookID: webhookID, receivedAt: receivedAt)
        return (event, try JSONParser.parse(event.normalizedBody))
    }

    @Test func theDocumentedExampleBecomesTheDocumentedShape() throws {
        let text = """
            { "id": "evt_def456", "eventType": "verification.completed",
              "resourceType": "verification", "resourceId": "ver_abc123",
              "tenantId": "your-tenant-uuid", "timestamp": "2025-01-15T10:35:00Z",
              "data": { "verificationId": "ver_abc123", "externalId": "user-123",
                        "status": "verified", "decision": "auto_approve",
                        "decisionReason": "All checks passed", "overallScore": 96.3 } }
            """
        let (event, json) = try normalize(text)
        #expect(event.id == "evt_def456")
        #expect(event.type == "verification.completed")
        #expect(event.verificationID == "ver_abc123")
        let expected: JSONValue = [
            "id": "evt_def456", "type": "verification.completed", "occurredAt": "2025-01-15T10:35:00Z",
            "receivedAt": .string(receivedAt.iso8601Milliseconds), "tenantId": "your-tenant-uuid",
            "verification": [
                "id": "ver_abc123", "externalId": "user-123", "status": "verified", "decision": "auto_approve",
                "outcome": "approved", "reason": "All checks passed", "score": .number("96.3"),
            ],
            "fraudAlert": nil,
            "data": [
                "verificationId": "ver_abc123", "externalId": "user-123", "status": "verified", "decision": "auto_approve",
                "decisionReason": "All checks passed", "overallScore": .number("96.3"),
            ],
        ]
        #expect(json == expected)
        #expect(receivedAt.iso8601Milliseconds == "2026-11-18T11:06:40.123Z")
    }

    @Test func dataIsPassedThroughByteForByte() throws {
        let data = #"{ "z": 1,   "a" : [1.50, "\u00e9"], "nested": {"x": null} }"#
        let (event, _) = try normalize(#"{"eventType":"verification.completed","data":"# + data + "}")
        let text = String(decoding: event.normalizedBody, as: UTF8.self)
        #expect(text.hasSuffix(#","data":"# + data + "}"))
    }

    @Test func snakeCaseIsReadToo() throws {
        let (event, json) = try normalize(
            #"{"id":"evt_1","event_type":"verification.rejected","tenant_id":"t1","occurred_at":"2025-01-01T00:00:00Z","#
                + #""data":{"verification_id":"ver_9","external_id":"u9","status":"rejected","decision":"auto_reject","decision_reason":"Bad document","overall_score":12}}"#)
        #expect(event.type == "verification.rejected")
        #expect(json["tenantId"] == "t1")
        #expect(json["occurredAt"] == "2025-01-01T00:00:00Z")
        #expect(json["verification"] == [
            "id": "ver_9", "externalId": "u9", "status": "rejected", "decision": "auto_reject", "outcome": "rejected",
            "reason": "Bad document", "score": .number("12"),
        ])
    }

    @Test func oldBodiesWithOnlyEventTypeAndDataAreAccepted() throws {
        let body = #"{"eventType":"verification.completed","data":{"verificationId":"ver_1","decision":"manual_review"}}"#
        let (event, json) = try normalize(body)
        #expect(event.id == "sha256:" + Hex.encode(SHA256.hash(data: Array(body.utf8))))
        #expect(json["occurredAt"] == .null)
        #expect(json["tenantId"] == .null)
        #expect(json["verification"]?["outcome"] == "review")
        #expect(try normalize(body, webhookID: "evt_header").event.id == "evt_header")
        // No path carries `.` or `..` as a segment: the replay of such an id could not be asked for.
        for unusable in [".", ".."] { #expect(try normalize(body, webhookID: unusable).event.id.hasPrefix("sha256:")) }
    }

    @Test(arguments: [
        ("auto_approve", nil, "approved"), ("auto_reject", nil, "rejected"), ("manual_review", nil, "review"),
        (nil, "verified", "approved"), (nil, "rejected", "rejected"), (nil, "manual_review", "review"), (nil, "failed", "failed"),
        (nil, "expired", "expired"), (nil, "pending", "pending"), (nil, "processing", "pending"), (nil, "document_required", "pending"),
        (nil, "something_new", "unknown"), ("auto_approve", "failed", "approved"),
    ] as [(String?, String?, String)])
    func outcomeComesFromDecisionThenStatus(decision: String?, status: String?, outcome: String) throws {
        var data: [JSONMember] = [.init("verificationId", "ver_1")]
        if let decision { data.append(.init("decision", .string(decision))) }
        if let status { data.append(.init("status", .string(status))) }
        let body = JSONWriter.encode(["eventType": "verification.completed", "data": .object(data)])
        let event = try EventNormalizer.normalize(body: body, webhookID: nil, receivedAt: receivedAt)
        #expect(try JSONParser.parse(event.normalizedBody)["verification"]?["outcome"] == .string(outcome))
    }

    @Test(arguments: [
        ("verification.verified", "approved"), ("verification.rejected", "rejected"), ("verification.completed", "unknown"),
    ])
    func eventTypeDecidesWhenNothingElseDoes(type: String, outcome: String) throws {
        let (_, json) = try normalize(#"{"eventType":""# + type + #"","data":{"verificationId":"ver_1"}}"#)
        #expect(json["verification"]?["outcome"] == .string(outcome))
    }

    @Test func fraudAlertsFillFraudAlert() throws {
        let (event, json) = try normalize(
            #"{"id":"evt_f","eventType":"fraud_alert.created","data":{"id":"alert_1","verificationId":"ver_7","externalId":"u7","#
                + #""alertType":"document_tampering","severity":"high","status":"open","description":"Altered"}}"#)
        #expect(event.verificationID == "ver_7")
        #expect(json["fraudAlert"] == [
            "id": "alert_1", "alertType": "document_tampering", "severity": "high", "status": "open", "description": "Altered",
            "verificationId": "ver_7", "externalId": "u7",
        ])
        #expect(json["verification"]?["id"] == "ver_7")
    }

    @Test func unknownTypesAreDeliveredWithWhatTheDataAllows() throws {
        let (event, json) = try normalize(#"{"id":"e","eventType":"document.uploaded","extra":1,"data":{"verificationId":"ver_2"}}"#)
        #expect(event.type == "document.uploaded")
        #expect(json["verification"]?["id"] == "ver_2")
        #expect(json["fraudAlert"] == .null)
        let (_, bare) = try normalize(#"{"eventType":"account.updated"}"#)
        #expect(bare["verification"] == .null)
        #expect(bare["data"] == .null)
    }

    @Test(arguments: [
        "", "   ", "[]", "\"text\"", "{}", #"{"eventType":""}"#, #"{"eventType":5}"#, #"{"data":{}}"#, "{not json",
        "\u{00}\u{01}binary",
    ])
    func payloadsWithoutAnEventTypeAreInvalid(text: String) {
        #expect(throws: InvalidPayload.self) { try normalize(text) }
    }
}
