import KoraSidecar
import KoraSidecarCore

/// How `kora-sidecar simulate` behaves: where it listens, how it signs and where it sends webhooks,
/// and the knobs that make the sandbox's timing testable.
package struct SimulatorConfiguration: Sendable {
    /// The address to bind.
    package var host = "127.0.0.1"
    /// The port to bind; 0 picks a free one (reported through `onListening`).
    package var port = 8090
    /// The webhook secret (`whsec_…`); its UTF-8 bytes are the HMAC key, as with Kora.
    package var webhookSecret: Secret
    /// The tenant-wide "dashboard" webhook URL; events go here and to each verification's `callbackUrl`.
    package var webhookURL: String?
    /// The API keys accepted; empty accepts any non-empty Bearer key.
    package var apiKeys: [String] = []
    /// The tenant accepted in `X-Tenant-ID`; nil accepts any non-empty tenant. Another is refused
    /// with 403, as Kora refuses a key used with a tenant it does not belong to.
    package var tenantID: String?
    /// Completes every verification this long after it was created, as if the user finished the flow.
    package var autoComplete: Duration?
    /// Requests allowed per minute, reported in `X-RateLimit-*` on every answer as Kora does. The
    /// default is far above Kora's plans (10, 50 or 200): the headers tell the truth, yet nothing is
    /// refused in practice, nor held back by a sidecar that learns its budget from them (a plan's 200
    /// would hold a test's 201st call for up to a minute).
    package var rateLimitPerMinute = SimulatorConfiguration.generousRateLimit
    /// The default `rateLimitPerMinute`: the most `kora.rateLimit.perMinute` accepts.
    package static let generousRateLimit = 100_000
    /// The length of the rate-limit window: a minute, as Kora's, shorter in tests.
    package var rateLimitWindowSeconds: Int64 = 60
    /// How long `test-slow-` verifications take to decide (Kora's sandbox: 10 s).
    package var slowDelay: Duration = .seconds(10)
    /// How long a `test-expired-` verification stays approved before it expires.
    var expiryDelay: Duration = .seconds(60)
    /// Waits before the second, third, … attempt of a webhook that was not answered 2xx.
    var webhookRetryDelays: [Duration] = [.seconds(1), .seconds(2), .seconds(4)]
    /// Largest request body accepted (uploads are base64 images of several MB).
    package var maxBodyBytes = 26_214_400
    /// The wall clock (rate-limit windows, timestamps, signatures).
    package var clock: @Sendable () -> UnixTime = UnixTime.now

    /// A simulator signing its webhooks with `webhookSecret`.
    package init(webhookSecret: Secret) { self.webhookSecret = webhookSecret }
}

/// The sandbox outcomes, chosen by the `externalId` prefix (KORA.md §5).
package enum SandboxOutcome: String, Sendable, CaseIterable {
    case approve
    case reject
    case review
    case fraud
    case expired
    case slow

    /// The `externalId` prefix that selects this outcome, e.g. `test-approve-`.
    package var prefix: String { "test-\(rawValue)-" }

    /// The outcome `externalID` selects; anything without a known prefix is approved.
    init(externalID: String) {
        self = Self.allCases.first { externalID.hasPrefix($0.prefix) } ?? .approve
    }

    /// What happens, in a few words, for people reading the demo.
    package var summary: String {
        switch self {
        case .approve: "auto-approved, high score"
        case .reject: "auto-rejected"
        case .review: "sent to manual review"
        case .fraud: "fraud alert, then rejection"
        case .expired: "approved, then expires"
        case .slow: "approved after a delay"
        }
    }
}
