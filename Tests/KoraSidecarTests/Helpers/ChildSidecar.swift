import Foundation
import KoraSidecar
import Testing

/// Runs the real binary (configured by ``writeProcessConfig``, store in `directory`) delivering to a
/// fresh receiver, for the duration of `body`; then expects it to stop on SIGTERM with status 0.
func withChildSidecar(
    directory: String, extra: String = "", _ body: @Sendable (SidecarProcess, RunningSidecar, Receiver) async throws -> Void
) async throws {
    let receiver = Receiver()
    try await withReceiver(receiver) { (port: Int) async throws in
        let config = try writeProcessConfig(directory: directory, receiverPort: port, extra: extra)
        let child = try SidecarProcess(config: config)
        let sidecar = try await child.running()
        try await body(child, sidecar, receiver)
        child.signal(SIGTERM)
        #expect(try await child.exitStatus() == 0)
        #expect(!child.log.contains { $0.contains("Fatal error") }, "\(child.log.suffix(5))")
    }
}

/// Sends a new signed event and expects it accepted (200) and delivered, each within a generous
/// liveness bound (the request's and the delivery's 10 s time-outs), not a measured threshold.
func expectServesAValidWebhook(_ sidecar: RunningSidecar, _ receiver: Receiver, _ sourceLocation: SourceLocation = #_sourceLocation) async throws {
    let id = "evt_probe_" + TestEvent.randomID()
    let answer = try await sendSigned(TestEvent.body(eventID: id), to: sidecar, timeout: .seconds(10))
    #expect(answer.status == 200, "\(answer.body)", sourceLocation: sourceLocation)
    try await waitUntil("the probe \(id) to be delivered") { receiver.deliveries.contains { $0.header("webhook-id") == id } }
}
