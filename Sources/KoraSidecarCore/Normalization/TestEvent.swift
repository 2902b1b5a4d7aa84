/// Realistic Kora webhook bodies, for `send-test-event`, the simulator, the demo and the tests.
package enum TestEvent {
    /// A Kora event body as KORA.md §3 shows it.
    package static func body(
        type: String = "verification.completed", decision: String = "auto_approve", externalID: String = "user-123",
        eventID: String = "evt_" + RandomID.make(), verificationID: String = "ver_" + RandomID.make(), tenantID: String = "tenant-demo",
        at: UnixTime = .now()
    ) -> [UInt8] {
        let status =
            switch decision {
            case "auto_approve": "verified"
            case "auto_reject": "rejected"
            case "manual_review": "manual_review"
            default: "processing"
            }
        let data: JSONValue
        if type.hasPrefix("fraud_alert.") {
            data = [
                "id": .string("alert_" + RandomID.make()), "verificationId": .string(verificationID), "externalId": .string(externalID),
                "alertType": "document_tampering", "severity": "high", "status": "open",
                "description": "Document shows signs of digital alteration", "createdAt": .string(at.iso8601Seconds),
            ]
        } else {
            data = [
                "verificationId": .string(verificationID), "externalId": .string(externalID), "status": .string(status),
                "decision": .string(decision), "decisionReason": .string(reason(for: decision)),
                "overallScore": .number(decision == "auto_approve" ? "96.3" : decision == "auto_reject" ? "12.5" : "61.0"),
            ]
        }
        let resource: (String, String) = type.hasPrefix("fraud_alert.") ? ("fraud_alert", verificationID) : ("verification", verificationID)
        return JSONWriter.encode([
            "id": .string(eventID), "eventType": .string(type), "resourceType": .string(resource.0),
            "resourceId": .string(resource.1), "tenantId": .string(tenantID), "timestamp": .string(at.iso8601Seconds),
            "data": data,
        ])
    }

    /// The decisions Kora's sandbox makes.
    package static let decisions = ["auto_approve", "auto_reject", "manual_review"]

    /// The decision an event of `type` carries: a rejection's is `auto_reject`, any other's `auto_approve`.
    package static func decision(for type: String) -> String {
        type == "verification.rejected" ? "auto_reject" : "auto_approve"
    }

    private static func reason(for decision: String) -> String {
        switch decision {
        case "auto_approve": "All checks passed"
        case "auto_reject": "Document authenticity check failed"
        case "manual_review": "Face match below auto-approve threshold"
        default: "Processing"
        }
    }
}
