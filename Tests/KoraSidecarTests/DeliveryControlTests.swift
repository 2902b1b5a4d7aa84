import Foundation
import Logging
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

/// Delivery that respects the services: the events of one verification in order, through real
/// listeners, on SQLite and on PostgreSQL replicas.
@Suite("Delivery control")
struct DeliveryControlTests {
    enum Store: String, CaseIterable, Sendable {
        case sqlite, postgresReplicas
    }

    /// Two stores over one database for PostgreSQL (two replicas), one SQLite store otherwise.
    func stores(_ kind: Store) async throws -> [any SidecarStore] {
        switch kind {
        case .sqlite:
            return [try SQLiteStore(path: try temporaryDirectory() + "/store.sqlite")]
        case .postgresReplicas:
            let url = Secret(try await PostgresServer.shared().createDatabase())
            var stores: [any SidecarStore] = []
            for _ in 0..<2 {
                let store = try PostgresStore(url: url, logger: Logger(label: "test"), operationTimeout: .seconds(5) * Sanitizer.slowdown)
                Task { await store.run() }
                try await store.waitUntilMigrated(timeout: .seconds(60))
                stores.append(store)
            }
            return stores
        }
    }

    @Test(arguments: Store.allCases)
    func aVerificationsEventsArriveInOrderWhileOthersAreNotHeldUp(store kind: Store) async throws {
        // The first event of ver_ordered fails twice; its two later events must wait for it.
        let receiver = Receiver { delivery, _ in
            delivery.header("webhook-id") == "evt_first" && delivery.header("X-Kora-Delivery-Attempt") != "3" ? .serviceUnavailable : .ok
        }
        let stores = try await stores(kind)
        try await withReceiver(receiver) { (port: Int) async throws in
            let configuration = testConfiguration(services: [testService("app", target: .url("http://127.0.0.1:\(port)/e"))], mode: .queued)
            try await withReplicas(configuration, stores: stores) { sidecar in
                for id in ["evt_first", "evt_second", "evt_third"] {
                    let body = TestEvent.body(eventID: id, verificationID: "ver_ordered")
                    #expect(try await sendSigned(body, to: sidecar).status == 200)
                }
                #expect(try await sendSigned(TestEvent.body(eventID: "evt_other", verificationID: "ver_other"), to: sidecar).status == 200)
                _ = try await receiver.waitFor(6, timeout: .seconds(20))
                let arrivals = receiver.deliveries.map { $0.header("webhook-id") ?? "" }
                #expect(arrivals.filter { $0 != "evt_other" } == ["evt_first", "evt_first", "evt_first", "evt_second", "evt_third"])
                // The other verification went at once, before the first event's retries were over.
                #expect(arrivals.firstIndex(of: "evt_other")! < arrivals.lastIndex(of: "evt_first")!)
            }
        }
    }

    /// Runs one sidecar per store (replicas sharing a database) with a fast retry schedule; `body`
    /// sends to the first.
    func withReplicas(
        _ configuration: SidecarConfiguration, stores: [any SidecarStore], _ body: @Sendable @escaping (RunningSidecar) async throws -> Void
    ) async throws {
        var options = SidecarOptions()
        options.store = stores[0]
        options.retryPolicy = RetryPolicy(schedule: [.milliseconds(200), .milliseconds(200), .milliseconds(200)], jitter: 0)
        guard stores.count > 1 else {
            try await withSidecar(configuration, options: options, body)
            return
        }
        var second = options
        second.store = stores[1]
        let first = options
        try await withSidecar(configuration, options: second) { _ in
            try await withSidecar(configuration, options: first, body)
        }
    }
}
