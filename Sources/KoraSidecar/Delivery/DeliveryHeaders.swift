import Crypto
import KoraSidecarCore
import NIOHTTP1

/// The headers of one delivery to a service (SPEC §6).
enum DeliveryHeaders {
    /// Builds the headers for `event` sent to `service` as attempt number `attempt` at `timestamp`.
    package static func make(
        event: KoraEvent, body: [UInt8], service: DeliveryService, attempt: Int, timestamp: Int64, reportOnly: Bool
    ) -> HTTPHeaders {
        var headers = HTTPHeaders()
        headers.reserveCapacity(10 + service.headers.count)
        headers.add(name: "Content-Type", value: "application/json")
        headers.add(name: "webhook-id", value: event.id)
        headers.add(name: "webhook-timestamp", value: String(timestamp))
        if !service.signingKeys.isEmpty {
            let signatures = service.signingKeys.map { StandardWebhooks.signature(key: $0, id: event.id, timestamp: timestamp, body: body) }
            headers.add(name: "webhook-signature", value: signatures.joined(separator: " "))
        }
        headers.add(name: "X-Kora-Event-Type", value: event.type)
        headers.add(name: "X-Kora-Delivery-Attempt", value: String(attempt))
        if reportOnly {
            headers.add(name: "X-Kora-Signature-Verified", value: event.signatureVerified ? "true" : "false")
        }
        if service.format == .original {
            for header in event.originalHeaders { headers.add(name: header.name, value: restated(header, of: event)) }
        }
        for header in service.headers { headers.add(name: header.name, value: header.value.value) }
        return headers
    }

    /// Kora's header as forwarded: `X-Webhook-ID` and `X-Event-Type` are not signed, so they say what
    /// the signed body says (the same values for Kora's own requests), never what a replayer wrote.
    private static func restated(_ header: (name: String, value: String), of event: KoraEvent) -> String {
        switch header.name.lowercased() {
        case "x-webhook-id": event.id
        case "x-event-type": event.type
        default: header.value
        }
    }
}
