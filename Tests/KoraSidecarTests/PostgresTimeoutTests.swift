import Foundation
import Logging
import NIOConcurrencyHelpers
import PostgresNIO
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting

@Suite("PostgreSQL time-outs")
struct PostgresTimeoutTests {
    @Test func callsStuckBehindALockGiveTheirConnectionsBackAtTheTimeOut() async throws {
        let url = try await PostgresServer.shared().createDatabase()
        // The time-out is what is tested: every budget call below is meant to run into it.
        let store = try PostgresStore(url: Secret(url), logger: quietLogger, operationTimeout: .seconds(2) * Sanitizer.slowdown, protection: .sealedForTests)
        let running = Task { await store.run() }
        defer { running.cancel() }
        try await store.waitUntilMigrated(timeout: .seconds(60))

        // Another replica, stalled while it holds the lock every replica's budget turn takes.
        let release = Gate()
        defer { release.open() }
        let holder = try await holdInAnotherSession(
            url, take: ["SELECT pg_advisory_lock(\(PostgresStore.budgetLock))"], giveBack: "SELECT pg_advisory_unlock(\(PostgresStore.budgetLock))",
            until: release)

        // More calls waiting for the lock than the pool has connections (16).
        let failed = await withTaskGroup(of: Bool.self) { group in
            for _ in 0..<20 {
                group.addTask { (try? await store.take(perWindow: 10, window: .seconds(60), at: .now())) == nil }
            }
            return await group.reduce(0) { $0 + ($1 ? 1 : 0) }
        }
        #expect(failed == 20)
        // While the lock is still held, the store serves everything else: the server ended the
        // waiting statements, so their connections came back to the pool.
        try await waitUntil("a store call succeeds while the lock is held", timeout: .seconds(30)) {
            (try? await store.unroutedCount()) != nil
        }
        #expect(!release.isOpen)
        release.open()
        try await holder.value
    }

    @Test func aDatabaseThatTakesNoConnectionAtStartIsNotReadyWithTheServersReasonUntilItDoes() async throws {
        // A role that may hold no connection at all: the sidecar starting as the database is full.
        let server = try await PostgresServer.shared()
        let database = String(try await server.createDatabase().split(separator: "/").last!.split(separator: "?").first!)
        let role = "full_" + database
        try await server.execute("CREATE ROLE \(role) LOGIN CONNECTION LIMIT 0; ALTER DATABASE \(database) OWNER TO \(role)")
        let store = try PostgresStore(
            url: Secret(server.url(database: database, user: role)), logger: quietLogger, operationTimeout: .seconds(1) * Sanitizer.slowdown,
            protection: .sealedForTests)
        let running = Task { await store.run() }
        defer { running.cancel() }
        try await waitUntil("the store to say why it is not ready", timeout: .seconds(30)) {
            do {
                try await store.waitUntilMigrated(timeout: .zero)
                return false
            } catch {
                return "\(error)".contains("too many connections for role")
            }
        }
        try await server.execute("ALTER ROLE \(role) CONNECTION LIMIT -1")
        try await store.waitUntilMigrated(timeout: .seconds(30))
        #expect(try await store.unroutedCount() == 0)
    }
}
