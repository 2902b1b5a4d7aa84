import Crypto

/// The signature headers of one request, as received.
public struct SignatureHeaders: Sendable {
    /// `X-Signature` (timestamped scheme).
    public var signature: String?
    /// `X-Timestamp`.
    public var timestamp: String?
    /// `X-Signature-Algorithm`.
    package var algorithm: String?
    /// `X-Kora-Signature` (legacy scheme).
    public var legacySignature: String?

    public init(signature: String? = nil, timestamp: String? = nil, algorithm: String? = nil, legacySignature: String? = nil) {
        self.signature = signature
        self.timestamp = timestamp
        self.algorithm = algorithm
        self.legacySignature = legacySignature
    }
}

/// Why a request's signature was not accepted; each maps to one row of SPEC §4.2.
public enum SignatureFailure: String, Error, Sendable, CaseIterable {
    case missingSignature = "MISSING_SIGNATURE"
    case invalidSignature = "INVALID_SIGNATURE"
    case staleTimestamp = "STALE_TIMESTAMP"
    case unsupportedAlgorithm = "UNSUPPORTED_ALGORITHM"
}

/// Verifies Kora webhook signatures over the exact raw body bytes, for every configured secret
/// (rotation), in constant time, within the timestamp tolerance in both directions.
public struct SignatureVerifier: Sendable {
    private let keys: [SymmetricKey]
    private let schemes: Set<SignatureScheme>
    private let toleranceSeconds: Int64

    public init(secrets: [Secret], schemes: [SignatureScheme], toleranceSeconds: Int) {
        self.keys = secrets.map { SymmetricKey(data: $0.bytes) }
        self.schemes = Set(schemes)
        self.toleranceSeconds = Int64(toleranceSeconds)
    }

    /// Checks `body` against `headers` at time `now` (Unix seconds) and says which scheme matched.
    ///
    /// A request carrying `X-Signature` is judged by the timestamped scheme alone, so a valid legacy
    /// signature cannot be used to bypass the replay window.
    public func verify(body: [UInt8], headers: SignatureHeaders, now: Int64) -> Result<SignatureScheme, SignatureFailure> {
        if let failure = failureBeforeBody(headers) { return .failure(failure) }
        if let signature = headers.signature {
            guard let text = headers.timestamp, let timestamp = Self.unixSeconds(text),
                abs(now.subtractingReportingOverflow(timestamp).partialValue) <= toleranceSeconds
            else { return .failure(.staleTimestamp) }
            return isSigned(body, signature: signature, timestamp: text) ? .success(.timestamped) : .failure(.invalidSignature)
        }
        if let signature = headers.legacySignature {
            guard let code = Hex.decode(Substring(signature).utf8), code.count == SHA256.byteCount, !Self.isTimestampedInput(body) else {
                return .failure(.invalidSignature)
            }
            for key in keys where HMAC<SHA256>.isValidAuthenticationCode(code, authenticating: body, using: key) {
                return .success(.legacy)
            }
            return .failure(.invalidSignature)
        }
        return .failure(.missingSignature)
    }

    /// The failure the headers alone decide, the same ``verify(body:headers:now:)`` would give: a
    /// request without a usable signature header is refused before its body is read, so that
    /// unsigned uploads cost the listener no memory. A timestamp outside the window needs the body
    /// (to tell Kora's late webhook from a forged one), so it is not decided here.
    public func failureBeforeBody(_ headers: SignatureHeaders) -> SignatureFailure? {
        if headers.signature != nil {
            guard schemes.contains(.timestamped) else { return .invalidSignature }
            if let algorithm = headers.algorithm, algorithm.lowercased() != "sha256" { return .unsupportedAlgorithm }
            return nil
        }
        if headers.legacySignature != nil { return schemes.contains(.legacy) ? nil : .invalidSignature }
        return .missingSignature
    }

    /// Whether a webhook refused as `STALE_TIMESTAMP` was nonetheless signed with a configured
    /// secret: Kora's own webhook, sent (or sent again) outside the tolerance window. Its event was
    /// not accepted, which an operator must hear of; a forged or garbled one is just refused.
    public func isSignedOutsideWindow(body: [UInt8], headers: SignatureHeaders) -> Bool {
        guard schemes.contains(.timestamped), let signature = headers.signature, let text = headers.timestamp, Self.unixSeconds(text) != nil
        else { return false }
        return isSigned(body, signature: signature, timestamp: text)
    }

    /// Whether `signature` is the timestamped scheme's HMAC of `timestamp.body` under one of the keys.
    private func isSigned(_ body: [UInt8], signature: String, timestamp: String) -> Bool {
        guard let code = Hex.decode(Substring(signature).utf8), code.count == SHA256.byteCount else { return false }
        var matched = false
        for key in keys where ConstantTime.equal(KoraSignature.timestampedCode(key: key, timestamp: timestamp, body: body), code) {
            matched = true
        }
        return matched
    }

    /// Whether `body` starts as the timestamped scheme's signed input does, `{digits}.`. Kora's
    /// timestamped signature of a body is a valid legacy signature of `{timestamp}.{body}`: such a
    /// body, never a Kora event (a JSON object), is refused, or any captured timestamped webhook
    /// could be replayed as a legacy one, outside its window, for ever.
    static func isTimestampedInput(_ body: [UInt8]) -> Bool {
        let digits = body.prefix(while: \.isASCIIDigit).count
        return digits > 0 && digits < body.count && body[digits] == UInt8(ascii: ".")
    }

    /// Parses Unix seconds: ASCII digits only, at most 12 of them (no sign, no fraction, no spaces).
    package static func unixSeconds(_ text: String) -> Int64? {
        guard (1...12).contains(text.utf8.count), text.utf8.allSatisfy(\.isASCIIDigit) else { return nil }
        return Int64(text)
    }
}

/// Comparison whose time does not depend on where two byte strings differ.
package enum ConstantTime {
    /// Whether `lhs` and `rhs` hold the same bytes; time depends only on their lengths.
    package static func equal(_ lhs: some Sequence<UInt8>, _ rhs: some Collection<UInt8>) -> Bool {
        var difference: UInt8 = 0
        var count = 0
        var other = rhs.makeIterator()
        for byte in lhs {
            difference |= byte ^ (other.next() ?? ~byte)
            count += 1
        }
        return difference == 0 && count == rhs.count
    }

    /// The index of the first of `candidates` that holds `given`'s bytes. Every candidate is
    /// compared, whichever matches, so that the time does not say which one (or whether an early one) did.
    package static func firstMatch(_ given: [UInt8], in candidates: [[UInt8]]) -> Int? {
        var found: Int?
        for (index, candidate) in candidates.enumerated() where equal(given, candidate) && found == nil {
            found = index
        }
        return found
    }

    /// Whether two strings are equal, compared as UTF-8 in constant time (tokens).
    package static func equal(_ lhs: String, _ rhs: String) -> Bool {
        equal(Array(lhs.utf8), Array(rhs.utf8))
    }
}
