import AsyncHTTPClient
import Foundation
import Hummingbird
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

/// What a service receives (SPEC §6), over TCP and Unix sockets, checked by an independent
/// Standard Webhooks implementation.
@Suite("Delivery to services")
struct DeliveryTests {
    @Test func tcpDeliveryCarriesStandardWebhooksHeadersVerifiedByTheReferenceLibrary() async throws {
        let receiver = Receiver()
        try await withReceiver(receiver) { (port: Int) async throws in
            var service = testService("app", target: .url("http://127.0.0.1:\(port)/kora-events"))
            service.deliver?.headers = [("X-Api-Key", Secret("app-header-value"))]
            let configuration = testConfiguration(services: [service])
            try await withSidecar(configuration, options: memoryStore()) { (sidecar: RunningSidecar) async throws in
                let body = TestEvent.body(type: "verification.completed", eventID: "evt_tcp")
                #expect(try await sendSigned(body, to: sidecar).status == 200)
                let delivery = try #require(try await receiver.waitFor(1).first)
                #expect(delivery.path == "/kora-events")
                #expect(delivery.header("webhook-id") == "evt_tcp")
                #expect(delivery.header("X-Kora-Event-Type") == "verification.completed")
                #expect(delivery.header("X-Kora-Delivery-Attempt") == "1")
                #expect(delivery.header("X-Api-Key") == "app-header-value")
                #expect(delivery.header("Content-Type") == "application/json")
                #expect(delivery.header("X-Kora-Signature-Verified") == nil)
                let timestamp = try #require(delivery.header("webhook-timestamp").flatMap { Int64($0) })
                #expect(abs(timestamp - UnixTime.now().seconds) < 60)
                #expect(delivery.json?["verification"]?["outcome"] == "approved")
                let verdict = try verifyWithReferenceLibrary(secret: TestSecrets.signing, delivery: delivery)
                #expect(verdict.ok, "standardwebhooks said: \(verdict.output)")
                let forged = try verifyWithReferenceLibrary(secret: "whsec_" + Data(repeating: 7, count: 24).base64EncodedString(), delivery: delivery)
                #expect(!forged.ok)
            }
        }
    }

    @Test func duringASigningSecretRotationAReceiverHoldingEitherSecretVerifies() async throws {
        let receiver = Receiver()
        let previous = "whsec_" + Data(repeating: 9, count: 24).base64EncodedString()
        try await withReceiver(receiver) { (port: Int) async throws in
            var service = testService("app", target: .url("http://127.0.0.1:\(port)/kora-events"))
            service.deliver?.previousSigningSecret = Secret(previous)
            try await withSidecar(testConfiguration(services: [service]), options: memoryStore()) { (sidecar: RunningSidecar) async throws in
                #expect(try await sendSigned(TestEvent.body(eventID: "evt_rotation"), to: sidecar).status == 200)
                let delivery = try #require(try await receiver.waitFor(1).first)
                #expect(delivery.header("webhook-signature")?.split(separator: " ").count == 2)
                for secret in [TestSecrets.signing, previous] {
                    let verdict = try verifyWithReferenceLibrary(secret: secret, delivery: delivery)
                    #expect(verdict.ok, "standardwebhooks said: \(verdict.output)")
                }
                #expect(!(try verifyWithReferenceLibrary(secret: "whsec_" + Data(repeating: 7, count: 24).base64EncodedString(), delivery: delivery).ok))
            }
        }
    }

    @Test func unixSocketDelivery() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let socket = directory + "/app.sock"
        let receiver = Receiver()
        try await withReceiver(receiver, unixSocket: socket) { (_: Int) async throws in
            let configuration = testConfiguration(services: [testService("app", target: .unixSocket(socketPath: socket, path: "/hooks/kora"))])
            try await withSidecar(configuration, options: memoryStore()) { (sidecar: RunningSidecar) async throws in
                #expect(try await sendSigned(TestEvent.body(eventID: "evt_unix"), to: sidecar).status == 200)
                let delivery = try #require(try await receiver.waitFor(1).first)
                #expect(delivery.path == "/hooks/kora")
                // HTTP/1.1 requires Host; nginx and Go answer 400 without it.
                #expect(delivery.header("Host") == "localhost")
                #expect(delivery.header("webhook-id") == "evt_unix")
                #expect(try verifyWithReferenceLibrary(secret: TestSecrets.signing, delivery: delivery).ok)
            }
        }
    }

    @Test func eventFiltersRouteEachTypeToItsServices() async throws {
        let verifications = Receiver()
        let alerts = Receiver()
        try await withReceiver(verifications) { (first: Int) async throws in
            try await withReceiver(alerts) { (second: Int) async throws in
                let configuration = testConfiguration(services: [
                    testService("kyc", target: .url("http://127.0.0.1:\(first)/events"), events: ["verification.*"]),
                    testService("compliance", target: .url("http://127.0.0.1:\(second)/events"), events: ["fraud_alert.created"]),
                ])
                try await withSidecar(configuration, options: memoryStore()) { (sidecar: RunningSidecar) async throws in
                    for type in ["verification.completed", "fraud_alert.created", "verification.rejected", "document.uploaded"] {
                        #expect(try await sendSigned(TestEvent.body(type: type), to: sidecar).status == 200)
                    }
                    #expect(try await verifications.waitFor(2).map { $0.header("X-Kora-Event-Type") } == ["verification.completed", "verification.rejected"])
                    #expect(try await alerts.waitFor(1).map { $0.header("X-Kora-Event-Type") } == ["fraud_alert.created"])
                    #expect(verifications.count == 2)
                    #expect(alerts.count == 1)
                }
            }
        }
    }

    @Test func originalFormatForwardsKorasExactBytesAndHeaders() async throws {
        let receiver = Receiver()
        try await withReceiver(receiver) { (port: Int) async throws in
            let configuration = testConfiguration(services: [testService("legacy", target: .url("http://127.0.0.1:\(port)/events"), format: .original)])
            try await withSidecar(configuration, options: memoryStore()) { (sidecar: RunningSidecar) async throws in
                let body = Array("{ \"id\": \"evt_orig\",\n  \"eventType\": \"verification.completed\", \"data\": {\"decision\": \"auto_approve\"} }".utf8)
                let headers = KoraSignature.headers(scheme: .timestamped, secret: Secret(TestSecrets.webhook), body: body, timestamp: UnixTime.now().seconds)
                #expect(try await post(sidecar.webhookURL, body: body, headers: headers.map { ($0.name, $0.value) }).status == 200)
                let delivery = try #require(try await receiver.waitFor(1).first)
                #expect(delivery.body == body)
                #expect(delivery.header("X-Signature") == headers[0].value)
                #expect(delivery.header("X-Timestamp") == headers[1].value)
                // Legacy code can keep verifying Kora's own signature over the forwarded bytes.
                #expect(KoraSignature.timestamped(secret: Secret(TestSecrets.webhook), timestamp: headers[1].value, body: delivery.body) == delivery.header("X-Signature"))
                #expect(try verifyWithReferenceLibrary(secret: TestSecrets.signing, delivery: delivery).ok)
            }
        }
    }

    @Test func redirectsAreNotFollowedAndTimeoutsAreEnforced() async throws {
        let gate = Gate()
        let receiver = Receiver { delivery, _ in
            if delivery.path == "/hang" { await gate.wait() }
            return delivery.path == "/redirect" ? .found : .ok
        }
        try await withReceiver(receiver) { (port: Int) async throws in
            var hanging = testService("slow", target: .url("http://127.0.0.1:\(port)/hang"))
            hanging.deliver?.timeoutSeconds = 1
            let redirecting = testService("moved", target: .url("http://127.0.0.1:\(port)/redirect"))
            for service in [hanging, redirecting] {
                try await withSidecar(testConfiguration(services: [service]), options: memoryStore()) { (sidecar: RunningSidecar) async throws in
                    let answer = try await sendSigned(TestEvent.body(), to: sidecar)
                    #expect(answer.status == 503)
                    #expect(answer.code == "UNAVAILABLE")
                }
            }
            gate.open()
            #expect(receiver.deliveries.filter { $0.path == "/redirect" }.count == 1)
        }
    }

    @Test func aServiceAnswerIsReadOnlyUpToItsLimitAndItsStatusCounts() async throws {
        let router = Router()
        // A long body, and one that never ends: neither is kept, and neither holds the attempt until its time-out.
        router.post("long") { _, _ in
            Response(status: .accepted, body: .init(byteBuffer: ByteBuffer(repeating: 0x61, count: 4 << 20)))
        }
        router.post("endless") { _, _ in
            Response(
                status: .serviceUnavailable, headers: [.retryAfter: "7"],
                body: .init { writer in
                    while true { try await writer.write(ByteBuffer(repeating: 0x62, count: 16 << 10)) }
                })
        }
        try await withRouter(router) { port in
            let sender = EventSender(client: DeliveryClient(), reportOnly: false)
            let event = try EventNormalizer.normalize(body: TestEvent.body(), webhookID: nil, receivedAt: .now())
            for (path, status) in [("long", 202), ("endless", 503)] {
                var service = testService(path, target: .url("http://127.0.0.1:\(port)/\(path)"))
                service.deliver?.timeoutSeconds = 60
                let result = await sender.send(event, to: DeliveryService(name: path, deliver: service.deliver!), attempt: 1)
                #expect(result.statusCode == status, "\(path): \(result.error ?? "")")
                #expect(result.error == nil)
                #expect(result.durationMilliseconds < 30_000, "\(path) was read to its time-out")
            }
            let endless = await sender.send(
                event, to: DeliveryService(name: "endless", deliver: testService("endless", target: .url("http://127.0.0.1:\(port)/endless")).deliver!),
                attempt: 1)
            #expect(endless.retryAfter == .seconds(7))
        }
    }

    func memoryStore() -> SidecarOptions {
        var options = SidecarOptions()
        options.store = InMemoryStore()
        return options
    }
}
