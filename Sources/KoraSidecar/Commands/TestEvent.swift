import AsyncHTTPClient
import NIOCore

/// Realistic Kora webhook bodies and a client that signs and posts them (`send-test-event`).
public enum TestEvent {
    /// A Kora event body as KORA.md §3 shows it.
    public static func body(
        type: String = "verification.completed", decision: String = "auto_approve", externalID: String = "user-123",
        eventID: String = "evt_" + randomID(), verificationID: String = "ver_" + randomID(), tenantID: String = "tenant-demo",
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
                "id": .string("alert_" + randomID()), "verificationId": .string(verificationID), "externalId": .string(externalID),
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

    private static func reason(for decision: String) -> String {
        switch decision {
        case "auto_approve": "All checks passed"
        case "auto_reject": "Document authenticity check failed"
        case "manual_review": "Face match below auto-approve threshold"
        default: "Processing"
        }
    }

    /// Twelve random lowercase hex digits.
    public static func randomID() -> String {
        Hex.encode((0..<6).map { _ in UInt8.random(in: 0...255) })
    }

    /// Signs `body` under `scheme` and posts it to `url`; returns Kora's view: status and body.
    public static func send(
        body: [UInt8], to url: String, secret: Secret, scheme: SignatureScheme, timestamp: Int64 = UnixTime.now().seconds
    ) async throws -> (status: Int, body: String) {
        var request = HTTPClientRequest(url: url)
        request.method = .POST
        request.headers.add(name: "Content-Type", value: "application/json")
        for header in KoraSignature.headers(scheme: scheme, secret: secret, body: body, timestamp: timestamp) {
            request.headers.add(name: header.name, value: header.value)
        }
        if case .object(let members)? = try? JSONParser.parse(body), let id = members.first(where: { $0.key == "id" })?.value.text {
            request.headers.add(name: "X-Webhook-ID", value: id)
        }
        request.body = .bytes(ByteBuffer(bytes: body))
        let response = try await HTTPClient.shared.execute(request, timeout: .seconds(30))
        let answer = try await response.body.collect(upTo: 1 << 20)
        return (Int(response.status.code), String(buffer: answer))
    }
}

extension UnixTime {
    /// `2026-11-26T19:00:00Z`, as Kora writes timestamps.
    public var iso8601Seconds: String {
        iso8601Milliseconds.prefix(19) + "Z"
    }
}
