import Crypto
import KoraSidecar
import KoraSidecarCore

/// A verification as the simulator keeps it.
struct SimulatedVerification: Sendable {
    var id: String
    var tenantID: String
    var externalID: String
    var tier: String
    var status = "pending"
    var decision: String?
    var decisionReason: String?
    var overallScore: String?
    var callbackURL: String?
    var documentType: String?
    var metadata: JSONValue?
    var createdAt: UnixTime
    var updatedAt: UnixTime
    var expiresAt: UnixTime
    var uploads: [String: SimulatedUpload] = [:]

    /// The outcome its `externalId` selects.
    var outcome: SandboxOutcome { SandboxOutcome(externalID: externalID) }

    /// The verification object of Kora's API (KORA.md §2).
    var json: JSONValue {
        var scores: JSONValue = [:]
        if let overallScore {
            scores = ["overall": .number(overallScore), "documentAuthenticity": .number(overallScore), "faceMatch": .number(overallScore)]
        }
        return [
            "id": .string(id), "tenantId": .string(tenantID), "externalId": .string(externalID), "status": .string(status),
            "decision": .optional(decision), "decisionReason": .optional(decisionReason), "tier": .string(tier),
            "documentType": .optional(documentType), "scores": scores,
            "riskScore": overallScore.flatMap(Double.init).map { .number(String(Int((100 - $0).rounded()))) } ?? .null,
            "callbackUrl": .optional(callbackURL), "metadata": metadata ?? .object([]),
            "createdAt": .string(createdAt.iso8601Seconds), "updatedAt": .string(updatedAt.iso8601Seconds),
            "expiresAt": .string(expiresAt.iso8601Seconds),
        ]
    }

    /// The `data` of a `verification.*` webhook.
    var eventData: JSONValue {
        [
            "verificationId": .string(id), "externalId": .string(externalID), "status": .string(status),
            "decision": .optional(decision), "decisionReason": .optional(decisionReason),
            "overallScore": overallScore.map(JSONValue.number) ?? .null,
        ]
    }
}

/// An image or frame upload the simulator accepted: its size and digest, so tests can prove the
/// bytes arrived intact.
struct SimulatedUpload: Sendable, Equatable {
    /// Length of `imageBase64` (or of the whole body for frames), in bytes.
    package var bytes: Int
    /// Lowercase hex SHA-256 of those bytes.
    package var sha256: String

    init(_ bytes: some Collection<UInt8>) {
        self.bytes = bytes.count
        self.sha256 = Hex.encode(SHA256.hash(data: Array(bytes)))
    }
}

/// A fraud alert as the simulator keeps it.
struct SimulatedAlert: Sendable {
    var id: String
    var verificationID: String
    var externalID: String
    var alertType = "document_tampering"
    var severity = "high"
    var status = "open"
    var description = "Document shows signs of digital alteration"
    var createdAt: UnixTime
    var resolvedAt: UnixTime?
    var resolution: String?
    var notes: String?

    var json: JSONValue {
        [
            "id": .string(id), "verificationId": .string(verificationID), "externalId": .string(externalID),
            "alertType": .string(alertType), "severity": .string(severity), "status": .string(status),
            "description": .string(description), "createdAt": .string(createdAt.iso8601Seconds),
            "resolvedAt": .optional(resolvedAt?.iso8601Seconds), "resolution": .optional(resolution), "notes": .optional(notes),
        ]
    }
}

/// One webhook event ready to send.
struct PreparedEvent: Sendable {
    var id: String
    var type: String
    var verificationID: String
    var body: [UInt8]

    /// A Kora envelope (KORA.md §3) around `data`; the resource is the verification unless given.
    init(type: String, verification: SimulatedVerification, data: JSONValue, resourceID: String? = nil, at: UnixTime) {
        self.id = "evt_" + RandomID.make()
        self.type = type
        self.verificationID = verification.id
        let resourceType = type.hasPrefix("fraud_alert.") ? "fraud_alert" : "verification"
        self.body = JSONWriter.encode([
            "id": .string(id), "eventType": .string(type), "resourceType": .string(resourceType),
            "resourceId": .string(resourceID ?? verification.id),
            "tenantId": .string(verification.tenantID), "timestamp": .string(at.iso8601Seconds), "data": data,
        ])
    }
}

/// Which of Kora's two webhook destinations a send went to.
package enum WebhookDestination: String, Sendable {
    /// The verification's own `callbackUrl`.
    case callbackURL = "callbackUrl"
    /// The tenant-wide dashboard URL (`--webhook-url`).
    case dashboardURL = "dashboard URL"
}

/// One webhook attempt the simulator made.
package struct SentWebhook: Sendable {
    /// The event id (body `id` and `X-Webhook-ID`).
    package var eventID: String
    /// `eventType`, e.g. `verification.completed`.
    package var eventType: String
    /// The verification the event is about.
    package var verificationID: String
    /// Where it was sent.
    package var url: String
    /// Which destination that URL is.
    package var destination: WebhookDestination
    /// The attempt number, from 1.
    package var attempt: Int
    /// The receiver's status, when it answered.
    package var statusCode: Int?
    /// The receiver's body (at most 4 KB), or why the send failed.
    package var response: String
    /// The exact bytes sent.
    package var body: [UInt8]
    /// The headers sent (signature, timestamp, id, type).
    package var headers: [(name: String, value: String)]

    /// Whether the receiver answered 2xx.
    package var accepted: Bool { statusCode.map { (200..<300).contains($0) } ?? false }
}
