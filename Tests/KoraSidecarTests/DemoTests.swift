import Foundation
import NIOConcurrencyHelpers
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

/// `kora-sidecar demo`: the first command of the README must work, and say so only when it did.
@Suite struct DemoTests {
    @Test func demoWalksEverySandboxOutcomeThroughEveryHop() async throws {
        let lines = NIOLockedValueBox<[String]>([])
        var options = DemoOptions()
        options.slowDelay = .milliseconds(200)
        options.expiryDelay = .milliseconds(100)
        let passed = try await runDemo(options: options, logger: quietLogger) { line in lines.withLockedValue { $0.append(line) } }
        let output = lines.withLockedValue { $0 }
        #expect(passed)
        #expect(!output.contains { $0.contains("✗") })
        #expect(output.last == "✓ 6 of 6 sandbox outcomes went through every hop; two services shared Kora's budget.")
        #expect(output.contains { $0.contains("test-slow- takes 10 s") && $0.contains("200 ms") })
        for outcome in SandboxOutcome.allCases {
            let start = try #require(output.firstIndex { $0.hasPrefix("▶ \(outcome.prefix)") })
            let block = output[start...].prefix { !$0.isEmpty }
            let events = DemoWalk.expectedEvents(outcome).count
            #expect(block.filter { $0.contains("✓ 1. app → sidecar → Kora") }.count == 1, "\(outcome)")
            #expect(block.filter { $0.contains("✓ 2. app → sidecar → Kora") }.count == 1, "\(outcome)")
            #expect(block.filter { $0.contains("✓ 3. Kora → sidecar") && $0.contains("via callbackUrl") }.count == events, "\(outcome)")
            #expect(block.filter { $0.contains("✓ 4. Kora → sidecar") && $0.contains(#""duplicate":true"#) }.count == events, "\(outcome)")
            #expect(block.filter { $0.contains("✓ 5. sidecar → app") && $0.contains("webhook-signature valid") }.count == events, "\(outcome)")
            #expect(block.last == "  ✓ every hop worked", "\(outcome)")
        }
        #expect(output.contains { $0.contains("verification.expired → outcome expired") })
        #expect(output.contains { $0.contains("fraud_alert.created → fraud alert") })
        // Every automatic decision reaches the app as verification.completed with the decision, and as
        // verification.verified or verification.rejected for services that listen to those only.
        func delivered(_ outcome: SandboxOutcome) -> [String] {
            let start = output.firstIndex { $0.hasPrefix("▶ \(outcome.prefix)") } ?? output.endIndex
            return output[start...].prefix { !$0.isEmpty }.compactMap { line in
                guard line.contains("✓ 5. sidecar → app"), let arrow = line.range(of: "app ") else { return nil }
                return line[arrow.upperBound...].prefix { $0 != "," }.trimmingCharacters(in: .whitespaces)
            }
        }
        #expect(delivered(.approve) == ["verification.completed → outcome approved", "verification.verified → outcome approved"])
        #expect(delivered(.reject) == ["verification.completed → outcome rejected", "verification.rejected → outcome rejected"])
        #expect(delivered(.review) == ["verification.completed → outcome review"])
        #expect(
            delivered(.fraud).map { $0.prefix { $0 != " " } } == ["fraud_alert.created", "verification.completed", "verification.rejected"])
        // Two services share the key: the app's calls all go while the batch job floods, and Kora refuses none.
        let budget = try #require(output.firstIndex { $0.hasPrefix("▶ one Kora key, two services") })
        let block = output[budget...].prefix { !$0.isEmpty }
        #expect(block.contains { $0.contains("✓ batch-job sent \(DemoBudget.batchCalls) calls at once") })
        #expect(block.contains { $0.contains("✓ demo-app sent \(DemoBudget.appCalls) calls meanwhile → all 200") })
        #expect(block.contains { $0.contains("✓ Kora refused none") })
        #expect(block.last == "  ✓ the budget worked")
    }

    @Test func theReceivingAppRefusesABadSignature() async throws {
        let secret = Secret(TestSecrets.signing)
        let key = try #require(StandardWebhooks.key(from: secret))
        let body = Array(#"{"id":"evt_1"}"#.utf8)
        let signature = StandardWebhooks.signature(key: key, id: "evt_1", timestamp: 1_800_000_000, body: body)
        #expect(DemoReceiver.verify(body: body, id: "evt_1", timestamp: "1800000000", signatures: "v1,other " + signature, key: key, now: 1_800_000_010))
        #expect(!DemoReceiver.verify(body: body + [0x20], id: "evt_1", timestamp: "1800000000", signatures: signature, key: key, now: 1_800_000_010))
        #expect(!DemoReceiver.verify(body: body, id: "evt_2", timestamp: "1800000000", signatures: signature, key: key, now: 1_800_000_010))
        // Any header a local process sends: an extreme timestamp is refused, not an overflow that stops the demo.
        #expect(!DemoReceiver.verify(body: body, id: "evt_1", timestamp: "-9223372036854775808", signatures: signature, key: key, now: 1_800_000_010))
        #expect(!DemoReceiver.verify(body: body, id: "evt_1", timestamp: "1800000000", signatures: signature, key: key, now: 1_800_001_000))
    }
}
