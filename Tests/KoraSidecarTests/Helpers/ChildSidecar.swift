import Foundation
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

/// Runs the real binary (configured by ``writeProcessConfig``, store in `directory`, `webhooks` added
/// to the webhook listener's keys) delivering to a fresh receiver, for the duration of `body`; then
/// expects it to stop on SIGTERM with status 0.
func withChildSidecar(
    directory: String, webhooks: String? = nil, _ body: @Sendable (SidecarProcess, RunningSidecar, Receiver) async throws -> Void
) async throws {
    let receiver = Receiver()
    try await withReceiver(receiver) { (port: Int) async throws in
        let config = try writeProcessConfig(directory: directory, receiverPort: port)
        if let webhooks {
            let text = try String(contentsOfFile: config, encoding: .utf8)
            try text.replacingOccurrences(of: #""webhooks": {"#, with: #""webhooks": {\#(webhooks), "#)
                .write(toFile: config, atomically: true, encoding: .utf8)
        }
        // One malloc arena: memory freed by one thread is reused by the next, so the resident set
        // measures what the sidecar holds rather than how allocations spread over per-thread arenas.
        let child = try SidecarProcess(config: config, environment: ["MALLOC_ARENA_MAX": "1"])
        let sidecar = try await child.running()
        try await body(child, sidecar, receiver)
        child.signal(SIGTERM)
        try await child.expectCleanExit()
        #expect(!child.log.contains { $0.contains("Fatal error") }, "\(child.log.suffix(5))")
    }
}

/// Sends a new signed event and expects it accepted (200) and delivered, each within a generous
/// liveness bound (`timeout` for the request, 10 s for the delivery), not a measured threshold.
/// It comes on a connection of its own: a full listener closes the kept-alive connections that
/// waited longest, and a client's pool may not have seen that yet.
func expectServesAValidWebhook(
    _ sidecar: RunningSidecar, _ receiver: Receiver, timeout: Duration = .seconds(10), _ sourceLocation: SourceLocation = #_sourceLocation
) async throws {
    let id = "evt_probe_" + RandomID.make()
    let answer = try await sendSigned(TestEvent.body(eventID: id), to: sidecar, extra: [("Connection", "close")], timeout: timeout)
    #expect(answer.status == 200, "\(answer.body)", sourceLocation: sourceLocation)
    try await waitUntil("the probe \(id) to be delivered") { receiver.deliveries.contains { $0.header("webhook-id") == id } }
}
