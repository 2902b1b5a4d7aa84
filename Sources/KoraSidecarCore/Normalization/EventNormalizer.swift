import Crypto

/// Why a signed payload cannot be delivered: it is quarantined and answered 400 `INVALID_PAYLOAD`.
public struct InvalidPayload: Error, Sendable, Equatable {
    /// What is wrong, as a phrase safe to return to the sender.
    package var reason: String
}

/// Turns Kora's webhook bytes into a ``KoraEvent`` (SPEC §6): tolerant of camelCase and snake_case,
/// of old `{eventType, data}` bodies, of unknown types and of extra fields; `data` is copied
/// byte for byte from the input.
public enum EventNormalizer {
    /// Normalises `body`; `webhookID` is the `X-Webhook-ID` header, `receivedAt` the time of receipt.
    public static func normalize(
        body: [UInt8], webhookID: String?, receivedAt: UnixTime, signatureVerified: Bool = true,
        originalHeaders: [(name: String, value: String)] = []
    ) throws(InvalidPayload) -> KoraEvent {
        let root: JSONValue
        do {
            root = try JSONParser.parse(body)
        } catch {
            throw InvalidPayload(reason: "the body is not valid JSON (\(error.reason))")
        }
        guard case .object = root else { throw InvalidPayload(reason: "the body is not a JSON object") }
        let typeValue = root["eventType"] ?? root["event_type"] ?? root["type"]
        guard case .string(let type)? = typeValue, usableID(type) != nil else {
            throw InvalidPayload(reason: "the body has no eventType")
        }
        let dataMember = root.member("data")
        let data = dataMember?.value ?? .null
        // The body's digest only when the body names no id (Kora's do): as the id, or as a second
        // de-duplication key beside the unsigned header's.
        let id: String
        var digestKey: String?
        if let bodyID = string(root, "id").flatMap(usableID) {
            id = bodyID
        } else {
            let digest = "sha256:" + Hex.encode(SHA256.hash(data: body))
            id = webhookID.flatMap(usableID) ?? digest
            if id != digest { digestKey = digest }
        }

        let verification = verificationJSON(root: root, data: data, type: type)
        let fraudAlert: JSONValue = type.hasPrefix("fraud_alert.") ? fraudAlertJSON(root: root, data: data) : .null

        let occurredAt = string(root, "timestamp", "occurredAt", "occurred_at", "createdAt", "created_at")
        let envelope: JSONValue = [
            "id": .string(id),
            "type": .string(type),
            "occurredAt": .optional(occurredAt),
            "receivedAt": .string(receivedAt.iso8601Milliseconds),
            "tenantId": .optional(string(root, "tenantId", "tenant_id") ?? string(data, "tenantId", "tenant_id")),
            "verification": verification.json,
            "fraudAlert": fraudAlert,
        ]
        // `data` is spliced in as Kora's own bytes rather than re-encoded, so it arrives verbatim.
        var normalized = JSONWriter.encode(envelope)
        normalized.removeLast()
        normalized.append(contentsOf: Array(#","data":"#.utf8))
        if let dataMember {
            normalized.append(contentsOf: body[dataMember.rawRange])
        } else {
            normalized.append(contentsOf: Array("null".utf8))
        }
        normalized.append(UInt8(ascii: "}"))

        var event = KoraEvent(
            // A verification id no store can index (a NUL, kilobytes) is treated as none, or the event
            // could never be stored and Kora would send it forever.
            id: id, type: type, verificationID: verification.id.flatMap(storableID), normalizedBody: normalized, originalBody: body,
            originalHeaders: originalHeaders, signatureVerified: signatureVerified)
        event.statedTime = occurredAt
        if let digestKey { event.dedupKeys.append(digestKey) }
        return event
    }

    /// `text` when it can travel in a header (`webhook-id`, `X-Kora-Event-Type`) and in a path (the
    /// admin API's `/admin/events/{id}/replay`): 1 to 256 printable ASCII characters, not `.` or `..`,
    /// which no path can carry as a segment; nil otherwise, and the id falls back to the next source.
    private static func usableID(_ text: String) -> String? {
        (1...256).contains(text.utf8.count) && text.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) && text != "." && text != ".." ? text : nil
    }

    /// `text` when every store can keep and index it: 1 to 1024 bytes, no control character (a NUL
    /// is refused by PostgreSQL's text, kilobytes by its index).
    package static func storableID(_ text: String) -> String? {
        (1...1024).contains(text.utf8.count) && text.utf8.allSatisfy({ $0 >= 0x20 && $0 != 0x7F }) ? text : nil
    }

    private static func verificationJSON(root: JSONValue, data: JSONValue, type: String) -> (id: String?, json: JSONValue) {
        let isVerificationEvent = type.hasPrefix("verification.")
        var id = string(data, "verificationId", "verification_id")
        if id == nil, string(root, "resourceType", "resource_type") == "verification" {
            id = string(root, "resourceId", "resource_id")
        }
        if id == nil, isVerificationEvent { id = string(data, "id") }
        guard isVerificationEvent || id != nil else { return (nil, .null) }
        let decision = string(data, "decision")
        let status = string(data, "status")
        let score: JSONValue =
            switch data["overallScore"] ?? data["overall_score"] ?? data["score"] {
            case .number(let n)?: .number(n)
            default: .null
            }
        return (
            id,
            [
                "id": .optional(id),
                "externalId": .optional(string(data, "externalId", "external_id")),
                "status": .optional(isVerificationEvent || !type.hasPrefix("fraud_alert.") ? status : nil),
                "decision": .optional(decision),
                "outcome": .string(Outcome(decision: decision, status: isVerificationEvent ? status : nil, eventType: type).rawValue),
                "reason": .optional(string(data, "decisionReason", "decision_reason", "reason")),
                "score": score,
            ]
        )
    }

    private static func fraudAlertJSON(root: JSONValue, data: JSONValue) -> JSONValue {
        var id = string(data, "alertId", "alert_id", "id")
        if id == nil, string(root, "resourceType", "resource_type").map({ $0.hasPrefix("fraud") || $0 == "alert" }) ?? false {
            id = string(root, "resourceId", "resource_id")
        }
        return [
            "id": .optional(id),
            "alertType": .optional(string(data, "alertType", "alert_type", "type")),
            "severity": .optional(string(data, "severity")),
            "status": .optional(string(data, "status")),
            "description": .optional(string(data, "description")),
            "verificationId": .optional(string(data, "verificationId", "verification_id")),
            "externalId": .optional(string(data, "externalId", "external_id")),
        ]
    }

    /// The first of `keys` present in `object` as a string (or a number, as its text).
    private static func string(_ object: JSONValue, _ keys: String...) -> String? {
        for key in keys {
            if let text = object[key]?.text { return text }
        }
        return nil
    }
}
