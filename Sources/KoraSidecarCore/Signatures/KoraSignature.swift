import Crypto

/// Kora's webhook signatures, both generations (SPEC §4.1, KORA.md §3). Pure functions, no I/O.
public enum KoraSignature {
    /// The hex HMAC-SHA256 of `"{timestamp}." + body`: the `X-Signature` of the timestamped scheme.
    public static func timestamped(secret: Secret, timestamp: String, body: some Sequence<UInt8>) -> String {
        Hex.encode(timestampedCode(key: SymmetricKey(data: secret.bytes), timestamp: timestamp, body: body))
    }

    /// The hex HMAC-SHA256 of the raw body: the `X-Kora-Signature` of the legacy scheme.
    public static func legacy(secret: Secret, body: some Sequence<UInt8>) -> String {
        var hmac = HMAC<SHA256>(key: SymmetricKey(data: secret.bytes))
        hmac.update(data: Array(body))
        return Hex.encode(hmac.finalize())
    }

    /// The headers Kora sends for `body` under `scheme`, in the order Kora lists them.
    package static func headers(
        scheme: SignatureScheme, secret: Secret, body: [UInt8], timestamp: Int64
    ) -> [(name: String, value: String)] {
        switch scheme {
        case .timestamped:
            let text = String(timestamp)
            return [
                ("X-Signature", timestamped(secret: secret, timestamp: text, body: body)),
                ("X-Timestamp", text),
                ("X-Signature-Algorithm", "sha256"),
            ]
        case .legacy:
            return [("X-Kora-Signature", legacy(secret: secret, body: body))]
        }
    }

    static func timestampedCode(key: SymmetricKey, timestamp: String, body: some Sequence<UInt8>) -> HMAC<SHA256>.MAC {
        var hmac = HMAC<SHA256>(key: key)
        hmac.update(data: Array(timestamp.utf8))
        hmac.update(data: [UInt8(ascii: ".")])
        hmac.update(data: Array(body))
        return hmac.finalize()
    }
}
