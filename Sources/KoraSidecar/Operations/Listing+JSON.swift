import KoraSidecarCore

extension DeliverySummary {
    /// The JSON operators see (admin API and `deliveries` command).
    var listingJSON: JSONValue {
        [
            "id": .number(String(id)),
            "eventId": .string(eventID),
            "eventType": .string(eventType),
            "service": .string(service),
            "status": .string(status.rawValue),
            "attempts": .int(attempts),
            "nextAttemptAt": .optional(nextAttemptAt?.iso8601Milliseconds),
            "lastStatusCode": lastStatusCode.map(JSONValue.int) ?? .null,
            "lastError": .optional(lastError),
            "createdAt": .string(createdAt.iso8601Milliseconds),
            "updatedAt": .string(updatedAt.iso8601Milliseconds),
            "verificationId": .optional(verificationID),
        ]
    }
}

extension DeliveryDetail {
    /// A delivery with its attempt history.
    var listingJSON: JSONValue {
        guard case .object(var members) = summary.listingJSON else { return .null }
        members.append(
            .init(
                "history",
                .array(
                    attempts.map { attempt in
                        [
                            "attempt": .int(attempt.attempt),
                            "at": .string(attempt.at.iso8601Milliseconds),
                            "statusCode": attempt.statusCode.map(JSONValue.int) ?? .null,
                            "error": .optional(attempt.error),
                            "durationMilliseconds": .int(attempt.durationMilliseconds),
                        ]
                    })))
        return .object(members)
    }
}

extension QuarantinedPayload {
    /// A quarantined payload as operators list it (the body as text, as received).
    var listingJSON: JSONValue {
        [
            "id": .string("q\(id)"),
            "status": "quarantined",
            "receivedAt": .string(receivedAt.iso8601Milliseconds),
            "reason": .string(reason),
            "signatureVerified": .bool(signatureVerified),
            "headers": .object(
                headers.sorted { $0.key < $1.key }.map { header in
                    // Signature values stay in the store for forensics but are not shown.
                    let hidden = header.key.lowercased().hasSuffix("signature")
                    return JSONMember(header.key, .string(hidden ? "***" : header.value))
                }),
            "bodyState": .string(bodyProblem?.state ?? "kept"),
            "body": bodyProblem == nil ? .string(String(decoding: body, as: UTF8.self)) : .null,
        ]
    }
}

extension UnroutedEvent {
    /// An unrouted event as operators list it (no body: it holds identity data).
    var listingJSON: JSONValue {
        [
            "id": .string("u\(row)"),
            "status": "unrouted",
            "eventId": .string(eventID),
            "eventType": .string(eventType),
            "verificationId": .optional(verificationID),
            "receivedAt": .string(receivedAt.iso8601Milliseconds),
            "signatureVerified": .bool(signatureVerified),
        ]
    }
}

extension ServiceBreaker {
    /// A service's delivery state as `/admin/services` shows it.
    var listingJSON: JSONValue {
        let snapshot = snapshot
        return [
            "name": .string(service),
            "state": .string(snapshot.state.rawValue),
            "consecutiveFailures": .int(snapshot.consecutiveFailures),
            "pausedUntil": .optional(snapshot.openUntil?.iso8601Milliseconds),
            "cooldown": .string(DurationText.format(snapshot.cooldown)),
        ]
    }
}
