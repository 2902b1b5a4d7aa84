import Crypto
import HTTPTypes
import Hummingbird
import KoraSidecar
import KoraSidecarCore
import Logging
import NIOCore

/// One event the demo's receiving app got from the sidecar.
struct ReceivedEvent: Sendable {
    /// `webhook-id`: the event id.
    package var id: String
    /// `X-Kora-Event-Type`.
    package var type: String
    /// The normalized body's `verification.id`, if any.
    package var verificationID: String?
    /// The normalized body's `verification.outcome`, if any.
    package var outcome: String?
    /// The normalized body's `fraudAlert.alertType` and `severity`, for fraud alerts.
    package var alert: (type: String, severity: String)?
    /// Whether `webhook-signature` matched (Standard Webhooks) within five minutes of now.
    var signatureValid: Bool
    /// The body as received.
    package var body: [UInt8]
}

/// The demo's "your service": receives the sidecar's deliveries at `POST /kora-events` and checks
/// the Standard Webhooks signature, as a real service would with any Standard Webhooks library.
struct DemoReceiver: Sendable {
    /// The `whsec_…` secret shared with the sidecar (`deliver.signingSecret`).
    package let signingSecret: Secret
    /// Everything received, in order.
    package let received = ObservedLog<ReceivedEvent>()

    /// A receiver checking signatures made with `signingSecret`.
    init(signingSecret: Secret) { self.signingSecret = signingSecret }

    /// Whether the Standard Webhooks headers sign `body` with `key`, within `tolerance` seconds of `now`.
    package static func verify(
        body: [UInt8], id: String?, timestamp: String?, signatures: String?, key: SymmetricKey, now: Int64, tolerance: Int64 = 300
    ) -> Bool {
        // At most 12 digits: `now - seconds` cannot overflow, whatever the header holds.
        guard let id, let timestamp, let seconds = SignatureVerifier.unixSeconds(timestamp), abs(now - seconds) <= tolerance, let signatures
        else { return false }
        let expected = StandardWebhooks.signature(key: key, id: id, timestamp: seconds, body: body)
        var matched = false
        for candidate in signatures.split(separator: " ") where ConstantTime.equal(String(candidate), expected) { matched = true }
        return matched
    }

    /// The receiving app on `host:port` (0 picks a free port).
    package func build(
        host: String = "127.0.0.1", port: Int = 0, logger: Logger, onListening: @escaping @Sendable (SocketAddress?) async -> Void
    ) -> some ApplicationProtocol {
        let router = Router(context: SidecarRequestContext.self)
        router.add(middleware: ErrorShapeMiddleware())
        let key = StandardWebhooks.key(from: signingSecret)
        let received = self.received
        router.post("/kora-events") { request, context in
            let buffer = try await BodyReader.collect(request, channel: context.channel, limit: 1 << 20, timeout: .seconds(10))
            let body = Array(buffer.readableBytesView)
            let id = request.headers[HTTPField.Name("webhook-id")!]
            let valid =
                key.map {
                    Self.verify(
                        body: body, id: id, timestamp: request.headers[HTTPField.Name("webhook-timestamp")!],
                        signatures: request.headers[HTTPField.Name("webhook-signature")!], key: $0, now: UnixTime.now().seconds)
                } ?? false
            let json = try? JSONParser.parse(body)
            await received.append(
                ReceivedEvent(
                    id: id ?? "", type: request.headers[HTTPField.Name("X-Kora-Event-Type")!] ?? "",
                    verificationID: json?["verification"]?["id"]?.text, outcome: json?["verification"]?["outcome"]?.text,
                    alert: json?["fraudAlert"]?["alertType"]?.text.map { ($0, json?["fraudAlert"]?["severity"]?.text ?? "unknown") },
                    signatureValid: valid, body: body))
            guard valid else {
                throw SidecarHTTPError(.unauthorized, code: "INVALID_SIGNATURE", message: "The webhook-signature does not match.")
            }
            return Response(status: .noContent)
        }
        return Application(
            router: router, configuration: .init(address: .hostname(host, port: port), serverName: nil),
            onServerRunning: { channel in await onListening(channel.localAddress) }, logger: logger.with("listener", "demo-app"))
    }
}
