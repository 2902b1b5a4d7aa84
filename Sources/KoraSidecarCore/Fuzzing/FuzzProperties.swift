/// What must hold for any input to the parsers of outside input: the libFuzzer targets in `Fuzz/`
/// check these, and the Swift suite replays `Fuzz/Corpus` through the same functions. Each returns
/// nil when the property holds, else what broke; an input that crashes is a failure too.
public enum FuzzProperty {
    private static let secret = Secret("whsec_fuzz")
    private static let verifier = SignatureVerifier(secrets: [secret], schemes: [.timestamped, .legacy], toleranceSeconds: 300)
    private static let now: Int64 = 1_795_000_000

    /// Input: a selector byte, a header value, a newline, a body. Only the body's own signature verifies.
    public static func signature(_ bytes: [UInt8]) -> String? {
        guard let selector = bytes.first else { return nil }
        let rest = bytes.dropFirst()
        let split = rest.firstIndex(of: 0x0A) ?? rest.endIndex
        let value = String(decoding: rest[..<split], as: UTF8.self)
        let body = Array(rest[split...].dropFirst())
        let headers: SignatureHeaders
        switch selector % 4 {
        case 0: headers = SignatureHeaders(signature: value, timestamp: String(now), algorithm: "sha256")
        case 1: headers = SignatureHeaders(signature: KoraSignature.timestamped(secret: secret, timestamp: value, body: body), timestamp: value)
        case 2: headers = SignatureHeaders(legacySignature: value)
        default: headers = SignatureHeaders(signature: value, timestamp: value, algorithm: value, legacySignature: value)
        }
        guard case .success(let scheme) = verifier.verify(body: body, headers: headers, now: now) else { return nil }
        let genuine: Bool
        switch scheme {
        case .timestamped:
            genuine = headers.signature?.lowercased() == KoraSignature.timestamped(secret: secret, timestamp: headers.timestamp ?? "", body: body)
                && abs(now - (Int64(headers.timestamp ?? "") ?? .max / 2)) <= 300
        case .legacy:
            genuine = headers.legacySignature?.lowercased() == KoraSignature.legacy(secret: secret, body: body)
        }
        return genuine ? nil : "a signature verified that is not the body's own"
    }

    /// Input: a webhook body. Whatever the normaliser accepts becomes valid JSON.
    public static func normalizer(_ body: [UInt8]) -> String? {
        _ = try? JSONParser.parse(body, rejectDuplicateKeys: true)
        guard let event = try? EventNormalizer.normalize(body: body, webhookID: "fuzz", receivedAt: UnixTime(milliseconds: 1_795_000_000_000))
        else { return nil }
        return (try? JSONParser.parse(event.normalizedBody)) == nil ? "the normalised body is not JSON" : nil
    }

    /// Input: a configuration file. It loads, or it is refused with at least one reason.
    public static func configuration(_ bytes: [UInt8]) -> String? {
        do {
            _ = try SidecarConfiguration.load(bytes: bytes, source: "fuzz", environment: ["FUZZ_SECRET": "whsec_env"])
            return nil
        } catch let error as ConfigurationError {
            return error.problems.isEmpty ? "a configuration was refused without a reason" : nil
        } catch {
            return "unexpected error \(error)"
        }
    }

    /// Input: a duration, a newline, an allow pattern. A parsed duration round-trips through its text.
    public static func duration(_ bytes: [UInt8]) -> String? {
        let split = bytes.firstIndex(of: 0x0A) ?? bytes.endIndex
        let text = String(decoding: bytes[..<split], as: UTF8.self)
        _ = AllowPattern(String(decoding: bytes[split...].dropFirst(), as: UTF8.self))
        guard let duration = DurationText.parse(text) else { return nil }
        return DurationText.parse(DurationText.format(duration)) == duration ? nil : "\(text) does not round-trip"
    }
}
