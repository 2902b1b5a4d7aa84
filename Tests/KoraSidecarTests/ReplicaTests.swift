import NIOConcurrencyHelpers
import Foundation
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

/// Several real sidecar processes sharing one real PostgreSQL database.
@Suite("PostgreSQL replicas", .serialized)
struct ReplicaTests {
    /// One service with a five-second time-out (a loaded machine's answers arrive within it; a dead
    /// replica's lease then ends 35 s after its claim), whose breaker stays out of the way (these tests
    /// are about replicas, not pauses).
    static func services(port: Int) -> String {
        #"[{"name": "app", "deliver": {"url": "http://127.0.0.1:\#(port)/events", "signingSecret": "\#(TestSecrets.signing)", "timeoutSeconds": 5, "breaker": {"failures": 1000}}}]"#
    }

    @Test func twoReplicasReceivingTheSameEventsDeliverEachOnce() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let database = try await PostgresServer.shared().createDatabase()
        let receiver = Receiver()
        try await withReceiver(receiver) { (port: Int) async throws in
            let config = try writeProcessConfig(directory: directory, receiverPort: port, postgresURL: database)
            let replicas = try [SidecarProcess(config: config), SidecarProcess(config: config)]
            let running = [try await replicas[0].running(), try await replicas[1].running()]
            let ids = (0..<40).map { "evt_both_\($0)" }
            // Kora's two copies of each event (callback URL and dashboard URL) reach different replicas at once.
            try await withThrowingTaskGroup(of: Int.self) { group in
                for id in ids {
                    for sidecar in running { group.addTask { try await sendSigned(TestEvent.body(eventID: id), to: sidecar).status } }
                }
                for try await status in group { #expect(status == 200, "\(replicas.flatMap(\.log).filter { $0.contains("error") }.suffix(2))") }
            }
            try await waitUntil("every delivery to be marked delivered", timeout: .seconds(30)) {
                let listed = try await Binary.run(["deliveries", "list", "--status", "delivered", "--config", config])
                return ids.allSatisfy { listed.stdout.contains("\"\($0)\"") }
            }
            let pending = try await Binary.run(["deliveries", "list", "--status", "pending", "--config", config])
            #expect(pending.status == 0)
            #expect(!pending.stdout.contains("evt_both_"))
            // Every delivery row is delivered and none is pending, so no second copy can still come.
            let delivered = receiver.deliveries.compactMap { $0.header("webhook-id") }
            #expect(delivered.count == ids.count, "\(delivered.count) deliveries for \(ids.count) events")
            #expect(Set(delivered).count == ids.count)
            for replica in replicas { replica.signal(SIGTERM) }
            for replica in replicas { try await replica.expectCleanExit() }
        }
    }

    @Test func aReplicaKilledMidStreamLosesNoAcknowledgedEvent() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let database = try await PostgresServer.shared().createDatabase()
        // Every event fails its first attempt, so that the dying replica holds pending and leased work.
        let service = FirstAttemptRefused()
        try await withReceiver(service.receiver) { (port: Int) async throws in
            let config = try writeProcessConfig(
                directory: directory, receiverPort: port, services: Self.services(port: port), postgresURL: database)
            let doomed = try SidecarProcess(config: config)
            let survivor = try SidecarProcess(config: config)
            let targets = [try await doomed.running(), try await survivor.running()]
            // Each request may take as long as a loaded machine needs; once the doomed replica is gone, those
            // left are given up (the ones to it would retry their connection until their time-out).
            let acked = try await sendSixteenInFlight(200, prefix: "evt_replica_", timeout: .seconds(30), to: { targets[$0 % 2] }) {
                doomed.signal(SIGKILL)
            } thenGiveUpOnceDead: {
                _ = try await doomed.exitStatus()
            }
            #expect(try await doomed.exitStatus() == SIGKILL)
            #expect(acked.count >= 100, "only \(acked.count) events were acknowledged")
            // The survivor takes over the dead replica's work once its leases end.
            try await waitUntil("every acknowledged event to be delivered", timeout: .seconds(90)) {
                acked.isSubset(of: service.taken)
            }
            survivor.signal(SIGTERM)
            try await survivor.expectCleanExit()
        }
    }

    @Test func aDatabaseRestartMeans503AndRecoveryWithoutARestart() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        // A server of its own, since this test stops it; it is removed when the test process exits.
        let server = try await PostgresServer()
        let database = try await server.createDatabase()
        let receiver = Receiver()
        try await withReceiver(receiver) { (port: Int) async throws in
            let config = try writeProcessConfig(directory: directory, receiverPort: port, postgresURL: database)
            let child = try SidecarProcess(config: config, environment: Sanitizer.leaksNotFatal)
            let sidecar = try await child.running()
            let readyz = "http://127.0.0.1:\(sidecar.internalPort ?? 0)/readyz"
            try await waitUntil("the sidecar to be ready") { try await get(readyz).status == 200 }
            let acknowledged = Acknowledged()
            // Traffic runs through the outage: every answer is 200 (stored) or 503 (Kora retries), never 500.
            let statuses = NIOLockedValueBox<[Int]>([])
            let traffic = Task {
                var index = 0
                while !Task.isCancelled {
                    let id = "evt_restart_\(index)"
                    index += 1
                    let answer = try? await sendSigned(TestEvent.body(eventID: id), to: sidecar, timeout: .seconds(15))
                    if let answer { statuses.withLockedValue { $0.append(answer.status) } }
                    if answer?.status == 200 { acknowledged.insert(id) }
                }
            }
            try await waitUntil("traffic to flow") { acknowledged.ids.count >= 20 }

            try await server.stop()
            try await waitUntil("a webhook to be refused with 503", timeout: .seconds(30)) { statuses.withLockedValue { $0.contains(503) } }
            let down = try await get(readyz)
            #expect(down.status == 503)
            #expect(down.body.contains("PostgreSQL"), "\(down.body)")

            try await server.start()
            let before = acknowledged.ids.count
            try await waitUntil("webhooks to be accepted again", timeout: .seconds(30)) { acknowledged.ids.count > before + 10 }
            #expect(try await get(readyz).status == 200)
            traffic.cancel()
            _ = await traffic.result

            let acked = acknowledged.ids
            try await waitUntil("every acknowledged event to be delivered", timeout: .seconds(30)) {
                acked.isSubset(of: Set(receiver.deliveries.compactMap { $0.header("webhook-id") }))
            }
            #expect(statuses.withLockedValue { $0.allSatisfy { $0 == 200 || $0 == 503 } }, "\(statuses.withLockedValue { Set($0) })")
            child.signal(SIGTERM)
            let status = try? await child.exitStatus()
            #expect(status == 0, "\(child.log.suffix(8))")
        }
    }
}
