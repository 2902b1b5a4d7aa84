import Foundation
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting

/// What the sidecar says and keeps while it stops.
@Suite("Stopping")
struct StoppingTests {
    @Test func theOperationalEventsAnnouncedLastAreStoredBeforeTheStoreCloses() async throws {
        // A breaker announces under its lock, so its event is stored apart; the dispatcher's end waits for it.
        let store = InMemoryStore()
        let ops = testService("ops", target: .url("http://127.0.0.1:1/ops"), events: ["sidecar.*"])
        let events = OperationalEvents(store: store, services: [DeliveryService(name: "ops", deliver: try #require(ops.deliver))], logger: quietLogger)
        for index in 0..<50 { events.serviceChanged("app\(index)", paused: true, consecutiveFailures: 3, pausedUntil: nil) }
        await events.finishStoring()
        let depth = try await store.depth()
        #expect(depth.first { $0.service == "ops" && $0.status == .pending }?.count == 50)
    }

    @Test func readinessSaysStoppingWhileInFlightWebhooksFinish() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let gate = Gate()
        let receiver = Receiver { _, _ in
            await gate.wait()
            return .ok
        }
        try await withReceiver(receiver) { port in
            // Direct mode: a webhook stays in flight while its service holds it, and the stop waits for it.
            let config = try writeProcessConfig(
                directory: directory, receiverPort: port,
                services: #"[{"name": "app", "deliver": {"url": "http://127.0.0.1:\#(port)/events", "timeoutSeconds": 120}}]"#)
            try String(contentsOfFile: config, encoding: .utf8).replacingOccurrences(of: #""mode": "queued""#, with: #""mode": "direct""#)
                .write(toFile: config, atomically: true, encoding: .utf8)
            let process = try SidecarProcess(config: config)
            defer { gate.open() }
            let sidecar = try await process.running()
            try await waitUntil("the sidecar to be ready") { try await get(sidecar.internalURL("/readyz")).status == 200 }
            let held = Task { try await sendSigned(TestEvent.body(), to: sidecar, timeout: .seconds(120)) }
            try await waitUntil("the webhook to reach its service") { receiver.deliveries.count == 1 }

            process.signal(SIGTERM)
            // The internal listener still answers, and says the sidecar is stopping.
            try await waitUntil("readiness to say the sidecar is stopping") {
                let ready = try await get(sidecar.internalURL("/readyz"))
                return ready.status == 503 && ready.json?["reason"]?.text == "The sidecar is stopping."
            }
            gate.open()
            #expect(try await held.value.status == 200)
            try await process.expectCleanExit()
        }
    }
}
