import Foundation
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

/// A small seeded random generator, so that any failing input can be reproduced from its seed.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Mutation fuzzing of every parser that reads input from outside: no input may crash them.
/// (Seeded: a failure names its seed and iteration; the run is the same every time.)
@Suite("Seeded fuzzing")
struct FuzzTests {
    static let iterations = 20_000

    /// `seed` with a few random byte flips, insertions, deletions and splices of JSON-ish tokens.
    static func mutate(_ seed: [UInt8], _ random: inout SplitMix64) -> [UInt8] {
        var bytes = seed
        let tokens: [[UInt8]] = ["{", "}", "[", "]", "\"", ",", ":", "\\u", "\\ud800", "null", "-0.e", "1e999", "\u{00}", "\u{FF}"].map { Array($0.utf8) }
        for _ in 0..<Int.random(in: 1...4, using: &random) {
            switch Int.random(in: 0..<4, using: &random) {
            case 0 where !bytes.isEmpty: bytes[Int.random(in: 0..<bytes.count, using: &random)] = UInt8.random(in: 0...255, using: &random)
            case 1: bytes.insert(contentsOf: tokens.randomElement(using: &random)!, at: Int.random(in: 0...bytes.count, using: &random))
            case 2 where !bytes.isEmpty: bytes.remove(at: Int.random(in: 0..<bytes.count, using: &random))
            default: bytes = Array(bytes.prefix(Int.random(in: 0...bytes.count, using: &random)))
            }
        }
        return bytes
    }

    @Test func theNormaliserAndTheJSONParserNeverCrash() {
        var random = SplitMix64(state: 0x5EED_0001)
        let seeds = [
            TestEvent.body(), TestEvent.body(type: "fraud_alert.created"),
            Array(#"{"eventType":"verification.completed","data":{"verification_id":"v","status":"verified","overall_score":1.5e2}}"#.utf8),
            Array(String(repeating: "[", count: 70).utf8),
        ]
        var accepted = 0
        for iteration in 0..<Self.iterations {
            let input = Self.mutate(seeds[iteration % seeds.count], &random)
            if let event = try? EventNormalizer.normalize(body: input, webhookID: "h", receivedAt: .now()) {
                accepted += 1
                // Whatever is accepted normalises to valid JSON.
                #expect((try? JSONParser.parse(event.normalizedBody)) != nil, "iteration \(iteration)")
            }
            _ = try? JSONParser.parse(input, rejectDuplicateKeys: true)
        }
        #expect(accepted > 0)
    }

    @Test func signatureHeadersNeverCrashAndNeverVerifyAtRandom() {
        var random = SplitMix64(state: 0x5EED_0002)
        let verifier = SignatureVerifier(secrets: [Secret("whsec_fuzz")], schemes: [.timestamped, .legacy], toleranceSeconds: 300)
        let body = TestEvent.body()
        let valid = KoraSignature.timestamped(secret: Secret("whsec_fuzz"), timestamp: "1795000000", body: body)
        for iteration in 0..<Self.iterations {
            let signature = String(decoding: Self.mutate(Array(valid.utf8), &random), as: UTF8.self)
            let timestamp = String(decoding: Self.mutate(Array("1795000000".utf8), &random), as: UTF8.self)
            let headers = SignatureHeaders(
                signature: iteration % 2 == 0 ? signature : nil, timestamp: timestamp, algorithm: iteration % 3 == 0 ? signature : "sha256",
                legacySignature: signature)
            if case .success = verifier.verify(body: body, headers: headers, now: 1_795_000_000) {
                #expect(signature.lowercased() == valid, "a mutated signature verified at iteration \(iteration)")
            }
        }
    }

    @Test func configurationAndDurationsNeverCrash() {
        var random = SplitMix64(state: 0x5EED_0003)
        let seed = Array(#"{"webhooks": {"secrets": ["s"], "listen": {"port": 1}}, "delivery": {"retrySchedule": ["5s"]}, "services": [{"name": "a", "deliver": {"url": "http://x"}}]}"#.utf8)
        for _ in 0..<(Self.iterations / 4) {
            let input = Self.mutate(seed, &random)
            _ = try? SidecarConfiguration.load(bytes: input, source: "fuzz", environment: [:])
            _ = DurationText.parse(String(decoding: Self.mutate(Array("250ms".utf8), &random), as: UTF8.self))
            _ = AllowPattern(String(decoding: Self.mutate(Array("GET /verifications/*".utf8), &random), as: UTF8.self))
        }
    }
}

/// Every input of `Fuzz/Corpus` (the seeds and every crash found so far) through the property its
/// libFuzzer target checks, so a plain `swift test` guards against each regression.
@Suite("Fuzz corpus replay")
struct FuzzCorpusReplayTests {
    static let properties: [(target: String, property: @Sendable ([UInt8]) -> String?)] = [
        ("FuzzSignature", FuzzProperty.signature), ("FuzzNormalizer", FuzzProperty.normalizer),
        ("FuzzConfiguration", FuzzProperty.configuration), ("FuzzDuration", FuzzProperty.duration),
    ]

    @Test(arguments: properties.map(\.target))
    func everyCorpusInputKeepsItsProperty(target: String) throws {
        let property = try #require(Self.properties.first { $0.target == target }?.property)
        let folder = Binary.root + "/Fuzz/Corpus/" + target
        let inputs = try FileManager.default.contentsOfDirectory(atPath: folder).sorted()
        #expect(!inputs.isEmpty, "no corpus in \(folder)")
        for name in inputs {
            let bytes = try #require(FileManager.default.contents(atPath: folder + "/" + name))
            #expect(property(Array(bytes)) == nil, "\(target)/\(name)")
        }
    }
}
