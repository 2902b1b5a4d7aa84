/// One accepted Kora webhook event, normalised once at ingress and delivered unchanged on every attempt.
public struct KoraEvent: Sendable, Equatable {
    /// The event id (SPEC §4.3): body `id`, else `X-Webhook-ID`, else `sha256:` + hex of the body.
    package var id: String
    /// The event type, such as `verification.completed`.
    package var type: String
    /// The verification the event is about, when the payload names one (for `onlyOwnVerifications`).
    package var verificationID: String?
    /// The normalised body (schema version 1, SPEC §6).
    public var normalizedBody: [UInt8]
    /// Kora's exact bytes.
    package var originalBody: [UInt8]
    /// Kora's signature headers as received, for the `original` format.
    package var originalHeaders: [(name: String, value: String)]
    /// Whether the signature was verified; false only in report-only mode.
    package var signatureVerified: Bool
    /// Every key under which this event is de-duplicated: its id, plus the digest of the body when
    /// the id came from the unsigned `X-Webhook-ID` header (so that a captured body replayed under a
    /// new header is still recognised).
    package var dedupKeys: [String] = []

    /// When the body says the event happened (Kora's `timestamp`), as it says it.
    package var statedTime: String?

    /// ``statedTime`` when it is a readable time (read only when asked: the webhook path rarely needs
    /// it). Signed with the body, it bounds how old a legacy-signed webhook is, which no header does.
    package var occurredAt: UnixTime? { statedTime.flatMap(UnixTime.parse(dateOrTime:)) }

    /// The keys remembered once the event is accepted. An unverified event's (report-only mode) are
    /// apart from verified ones', so that a forgery cannot make Kora's signed event its duplicate.
    package var rememberedKeys: [String] { signatureVerified ? dedupKeys : dedupKeys.map { "unverified:" + $0 } }

    /// The keys under which an event seen before makes this one a duplicate: its own, and for an
    /// unverified event a verified one's too (Kora's copy that failed verification is not sent again).
    package var duplicateKeys: [String] { signatureVerified ? dedupKeys : dedupKeys + rememberedKeys }

    package init(
        id: String, type: String, verificationID: String?, normalizedBody: [UInt8], originalBody: [UInt8],
        originalHeaders: [(name: String, value: String)], signatureVerified: Bool
    ) {
        self.id = id
        self.type = type
        self.verificationID = verificationID
        self.normalizedBody = normalizedBody
        self.originalBody = originalBody
        self.originalHeaders = originalHeaders
        self.signatureVerified = signatureVerified
        self.dedupKeys = [id]
    }

    /// The body a service receives in `format`.
    package func body(for format: DeliveryFormat) -> [UInt8] {
        format == .normalized ? normalizedBody : originalBody
    }

    public static func == (lhs: KoraEvent, rhs: KoraEvent) -> Bool {
        lhs.id == rhs.id && lhs.type == rhs.type && lhs.verificationID == rhs.verificationID
            && lhs.normalizedBody == rhs.normalizedBody && lhs.originalBody == rhs.originalBody
            && lhs.originalHeaders.map(\.name) == rhs.originalHeaders.map(\.name)
            && lhs.originalHeaders.map(\.value) == rhs.originalHeaders.map(\.value)
            && lhs.signatureVerified == rhs.signatureVerified
    }
}
