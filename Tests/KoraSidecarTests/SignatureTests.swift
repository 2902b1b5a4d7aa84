import Crypto
import Foundation
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

@Suite("Kora signatures")
struct SignatureTests {
    let body = Array(#"{"id":"evt_1","eventType":"verification.completed","data":{}}"#.utf8)
    let now: Int64 = 1_795_000_000
    let secret = Secret("whsec_primary")

    func verifier(_ secrets: [String] = ["whsec_primary"], schemes: [SignatureScheme] = [.timestamped, .legacy]) -> SignatureVerifier {
        SignatureVerifier(secrets: secrets.map { Secret($0) }, schemes: schemes, toleranceSeconds: 300)
    }

    func timestamped(_ timestamp: Int64, secret: String = "whsec_primary", body: [UInt8]? = nil) -> SignatureHeaders {
        let signature = KoraSignature.timestamped(secret: Secret(secret), timestamp: String(timestamp), body: body ?? self.body)
        return SignatureHeaders(signature: signature, timestamp: String(timestamp), algorithm: "sha256")
    }

    @Test func timestampedSignatureMatchesAnIndependentHMAC() {
        let expected = HMAC<SHA256>.authenticationCode(for: Array("\(now).".utf8) + body, using: SymmetricKey(data: Array("whsec_primary".utf8)))
        #expect(KoraSignature.timestamped(secret: secret, timestamp: String(now), body: body) == Hex.encode(expected))
        #expect(verifier().verify(body: body, headers: timestamped(now), now: now) == .success(.timestamped))
    }

    @Test func legacySignatureIsTheHMACOfTheRawBody() {
        let expected = Hex.encode(HMAC<SHA256>.authenticationCode(for: body, using: SymmetricKey(data: Array("whsec_primary".utf8))))
        #expect(KoraSignature.legacy(secret: secret, body: body) == expected)
        #expect(verifier().verify(body: body, headers: .init(legacySignature: expected), now: now) == .success(.legacy))
    }

    @Test func hexIsComparedCaseInsensitively() {
        var headers = timestamped(now)
        headers.signature = headers.signature!.uppercased()
        #expect(verifier().verify(body: body, headers: headers, now: now) == .success(.timestamped))
        let legacy = KoraSignature.legacy(secret: secret, body: body).uppercased()
        #expect(verifier().verify(body: body, headers: .init(legacySignature: legacy), now: now) == .success(.legacy))
    }

    @Test func anyConfiguredSecretMayMatch() {
        let rotating = verifier(["whsec_old", "whsec_new"])
        #expect(rotating.verify(body: body, headers: timestamped(now, secret: "whsec_new"), now: now) == .success(.timestamped))
        #expect(rotating.verify(body: body, headers: timestamped(now, secret: "whsec_old"), now: now) == .success(.timestamped))
        #expect(rotating.verify(body: body, headers: timestamped(now, secret: "whsec_other"), now: now) == .failure(.invalidSignature))
    }

    @Test(arguments: [-300, 300, 0, -1, 1])
    func timestampsInsideTheToleranceAreAccepted(offset: Int64) {
        #expect(verifier().verify(body: body, headers: timestamped(now + offset), now: now) == .success(.timestamped))
    }

    @Test(arguments: [-301, 301, -86_400, 86_400])
    func timestampsOutsideTheToleranceAreStaleInBothDirections(offset: Int64) {
        #expect(verifier().verify(body: body, headers: timestamped(now + offset), now: now) == .failure(.staleTimestamp))
    }

    @Test(arguments: ["", "abc", "-5", "1795000000.5", " 1795000000", "17950000000000000000", "0x10"])
    func malformedTimestampsAreStale(text: String) {
        var headers = timestamped(now)
        headers.timestamp = text
        #expect(verifier().verify(body: body, headers: headers, now: now) == .failure(.staleTimestamp))
    }

    @Test func missingTimestampIsStale() {
        var headers = timestamped(now)
        headers.timestamp = nil
        #expect(verifier().verify(body: body, headers: headers, now: now) == .failure(.staleTimestamp))
    }

    @Test func onlySHA256IsSupported() {
        var headers = timestamped(now)
        headers.algorithm = "sha512"
        #expect(verifier().verify(body: body, headers: headers, now: now) == .failure(.unsupportedAlgorithm))
        headers.algorithm = "SHA256"
        #expect(verifier().verify(body: body, headers: headers, now: now) == .success(.timestamped))
        headers.algorithm = nil
        #expect(verifier().verify(body: body, headers: headers, now: now) == .success(.timestamped))
    }

    @Test func noSignatureHeaderIsMissing() {
        #expect(verifier().verify(body: body, headers: .init(), now: now) == .failure(.missingSignature))
        #expect(verifier().verify(body: body, headers: .init(timestamp: String(now)), now: now) == .failure(.missingSignature))
    }

    @Test(arguments: ["", "zz", "abc", String(repeating: "0", count: 64), String(repeating: "g", count: 64), String(repeating: "ab", count: 33)])
    func malformedSignaturesAreInvalid(signature: String) {
        var headers = timestamped(now)
        headers.signature = signature
        #expect(verifier().verify(body: body, headers: headers, now: now) == .failure(.invalidSignature))
        #expect(verifier().verify(body: body, headers: .init(legacySignature: signature), now: now) == .failure(.invalidSignature))
    }

    @Test func aRequestWithXSignatureIsJudgedByTheTimestampedSchemeOnly() {
        // A valid legacy signature must not rescue a stale or forged timestamped one (replay bypass).
        var headers = timestamped(now - 1000)
        headers.legacySignature = KoraSignature.legacy(secret: secret, body: body)
        #expect(verifier().verify(body: body, headers: headers, now: now) == .failure(.staleTimestamp))
        headers = timestamped(now, secret: "whsec_wrong")
        headers.legacySignature = KoraSignature.legacy(secret: secret, body: body)
        #expect(verifier().verify(body: body, headers: headers, now: now) == .failure(.invalidSignature))
    }

    @Test func aTimestampedSignatureIsNoLegacySignatureOfItsSignedInput() {
        // HMAC("{t}.{body}") is Kora's timestamped signature, and also the legacy signature of the body
        // "{t}.{body}": without the check, any captured webhook was a signed payload for ever.
        let captured = timestamped(now - 86_400)
        let replayed = Array("\(now - 86_400).".utf8) + body
        for schemes: [SignatureScheme] in [[.timestamped, .legacy], [.legacy]] {
            #expect(
                verifier(schemes: schemes).verify(body: replayed, headers: .init(legacySignature: captured.signature), now: now)
                    == .failure(.invalidSignature))
        }
        #expect(SignatureVerifier.isTimestampedInput(Array("1.{}".utf8)))
        for other in ["", "1", "12", ".{}", "{\"a\":1.5}", "1x.{}"] {
            #expect(!SignatureVerifier.isTimestampedInput(Array(other.utf8)), "\(other)")
        }
    }

    @Test func disabledSchemesAreRejected() {
        let legacyOnly = verifier(schemes: [.legacy])
        #expect(legacyOnly.verify(body: body, headers: timestamped(now), now: now) == .failure(.invalidSignature))
        let timestampedOnly = verifier(schemes: [.timestamped])
        let legacy = KoraSignature.legacy(secret: secret, body: body)
        #expect(timestampedOnly.verify(body: body, headers: .init(legacySignature: legacy), now: now) == .failure(.invalidSignature))
    }

    @Test func everyFlippedBitOfTheSignatureIsRejected() {
        let headers = timestamped(now)
        let code = Hex.decode(Substring(headers.signature!).utf8)!
        for position in 0..<code.count {
            var forged = code
            forged[position] ^= 0x01
            var forgedHeaders = headers
            forgedHeaders.signature = Hex.encode(forged)
            #expect(verifier().verify(body: body, headers: forgedHeaders, now: now) == .failure(.invalidSignature))
        }
    }

    @Test func theSignatureCoversTheExactBytes() {
        let headers = timestamped(now)
        var changed = body
        changed.append(UInt8(ascii: " "))
        #expect(verifier().verify(body: changed, headers: headers, now: now) == .failure(.invalidSignature))
        var otherTime = headers
        otherTime.timestamp = String(now + 1)
        #expect(verifier().verify(body: body, headers: otherTime, now: now) == .failure(.invalidSignature))
    }

    @Test func constantTimeEqualityComparesWholeValues() {
        #expect(ConstantTime.equal("token", "token"))
        #expect(!ConstantTime.equal("token", "tokeN"))
        #expect(!ConstantTime.equal("token", "token2"))
        #expect(!ConstantTime.equal("token2", "token"))
        #expect(!ConstantTime.equal("", "x"))
        #expect(ConstantTime.equal("", ""))
    }
}

@Suite("Standard Webhooks")
struct StandardWebhooksTests {
    @Test func matchesTheSpecificationsTestVector() throws {
        // The example of the Standard Webhooks reference libraries.
        let key = try #require(StandardWebhooks.key(from: Secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")))
        let signature = StandardWebhooks.signature(
            key: key, id: "msg_p5jXN8AQM9LWM0D4loKWxJek", timestamp: 1_614_265_330, body: Array(#"{"test": 2432232314}"#.utf8))
        #expect(signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
    }

    @Test func rejectsSecretsThatAreNotBase64OrTooShort() {
        #expect(StandardWebhooks.key(from: Secret("whsec_not base64!")) == nil)
        #expect(StandardWebhooks.key(from: Secret("whsec_c2hvcnQ=")) == nil)
        #expect(StandardWebhooks.key(from: Secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")) != nil)
    }
}
