import Crypto
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Standard Webhooks 1.0 signing of what the sidecar delivers (SPEC §6).
package enum StandardWebhooks {
    /// The HMAC key of a `whsec_…` secret: the base64 after the prefix, decoded; nil when it is not
    /// valid base64 or is shorter than 16 bytes.
    package static func key(from secret: Secret) -> SymmetricKey? {
        let text = secret.value.hasPrefix("whsec_") ? String(secret.value.dropFirst(6)) : secret.value
        guard let data = Data(base64Encoded: text), data.count >= 16 else { return nil }
        return SymmetricKey(data: data)
    }

    /// The `webhook-signature` value: `v1,` and the base64 HMAC-SHA256 of `"{id}.{timestamp}.{body}"`.
    package static func signature(key: SymmetricKey, id: String, timestamp: Int64, body: some Sequence<UInt8>) -> String {
        var hmac = HMAC<SHA256>(key: key)
        hmac.update(data: Array("\(id).\(timestamp).".utf8))
        hmac.update(data: Array(body))
        return "v1," + Data(hmac.finalize()).base64EncodedString()
    }
}
