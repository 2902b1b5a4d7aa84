import Foundation
import Logging
import PostgresNIO
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting

/// What the PostgreSQL schema promises the binaries that share it during a rolling update or a
/// rollback: an older one never reads a sealed body as an empty one, and never serves from a schema
/// it cannot read.
@Suite("PostgreSQL schema versions")
struct PostgresSchemaTests {
    /// A store on `url`, migrated (or failed to), and what stops it.
    func open(_ url: String, migrated: Bool = true) async throws -> (store: PostgresStore, stop: @Sendable () -> Void) {
        let store = try PostgresStore(url: Secret(url), logger: quietLogger, operationTimeout: .seconds(5) * Sanitizer.slowdown, protection: .sealedForTests)
        let running = Task { await store.run() }
        if migrated { try await store.waitUntilMigrated(timeout: .seconds(60)) }
        return (store, { running.cancel() })
    }

    func event(_ id: String) throws -> KoraEvent {
        try EventNormalizer.normalize(
            body: TestEvent.body(eventID: id, verificationID: "ver_" + RandomID.make()), webhookID: nil, receivedAt: .now(),
            originalHeaders: [("X-Signature", "abc")])
    }

    @Test func aSealedBodyLeavesThePlainColumnsNullAndIsStillDelivered() async throws {
        let url = try await PostgresServer.shared().createDatabase()
        let (store, stop) = try await open(url)
        defer { stop() }
        let sent = try event("evt_sealed")
        #expect(try await store.enqueue(sent, services: ["a"], at: .now(), dedupSince: .now().adding(.seconds(-60))) == .accepted)
        try await store.quarantine(.init(receivedAt: .now(), reason: "bad", body: [1, 2], headers: [:], signatureVerified: true))

        // A binary from before sealing reads these columns as the body: NULL makes it fail instead.
        #expect(try await postgresSQL(url, "SELECT count(*) FROM kora_events WHERE normalized IS NOT NULL OR original IS NOT NULL") == [0])
        #expect(try await postgresSQL(url, "SELECT count(*) FROM kora_quarantine WHERE body IS NOT NULL") == [0])
        let job = try #require(try await store.claimDue(service: "a", now: .now(), limit: 10, lease: .seconds(30), ordered: true).first)
        #expect(job.event.normalizedBody == sent.normalizedBody)
        #expect(try await store.quarantined(limit: 10).map(\.body) == [[1, 2]])
    }

    @Test func aStoreMigratedBeforeSealedBodiesWereNullIsMigratedWithoutARewriteAndItsBodiesStillRead() async throws {
        let url = try await PostgresServer.shared().createDatabase()
        let sent = try event("evt_old")
        do {
            let (store, stop) = try await open(url)
            defer { stop() }
            #expect(try await store.enqueue(sent, services: ["a"], at: .now(), dedupSince: .now().adding(.seconds(-60))) == .accepted)
        }
        // As version 8 left it: sealed bodies with empty plain columns, no reader version.
        _ = try await postgresSQL(
            url, "UPDATE kora_events SET normalized = '', original = ''", "ALTER TABLE kora_schema_version DROP COLUMN oldest_reader",
            "UPDATE kora_schema_version SET version = 8")

        let (store, stop) = try await open(url)
        defer { stop() }
        #expect(try await postgresSQL(url, "SELECT oldest_reader FROM kora_schema_version") == [Int64(PostgresSchema.oldestReader)])
        // The rows written before are left as they were (no table rewrite), and read as before.
        #expect(try await postgresSQL(url, "SELECT count(*) FROM kora_events WHERE normalized = ''") == [1])
        let job = try #require(try await store.claimDue(service: "a", now: .now(), limit: 10, lease: .seconds(30), ordered: true).first)
        #expect(job.event.normalizedBody == sent.normalizedBody)
        // What is written from now on leaves them NULL.
        #expect(try await store.enqueue(try event("evt_new"), services: ["a"], at: .now(), dedupSince: .now().adding(.seconds(-60))) == .accepted)
        #expect(try await postgresSQL(url, "SELECT count(*) FROM kora_events WHERE normalized IS NULL") == [1])
    }

    @Test func aNewerSchemaIsServedOnlyWhileItSaysThisVersionCanReadIt() async throws {
        let url = try await PostgresServer.shared().createDatabase()
        let known = Int64(PostgresSchema.migrations.count)
        do {
            let (_, stop) = try await open(url)
            stop()
        }
        // A newer binary's additive migration: this one serves beside it.
        _ = try await postgresSQL(url, "UPDATE kora_schema_version SET version = \(known + 1)")
        do {
            let (store, stop) = try await open(url)
            defer { stop() }
            #expect(try await store.unroutedCount() == 0)
        }
        // A newer binary's migration that changes what rows mean: a replica already running stops
        // being ready, and one starting does not serve.
        let (running, stopRunning) = try await open(url)
        defer { stopRunning() }
        try await running.checkWritable(at: .now())
        _ = try await postgresSQL(url, "UPDATE kora_schema_version SET oldest_reader = \(known + 1)")
        await #expect {
            try await running.checkWritable(at: .now())
        } throws: { error in
            "\(error)".contains("cannot read")
        }
        let (store, stop) = try await open(url, migrated: false)
        defer { stop() }
        await #expect {
            try await store.waitUntilMigrated(timeout: .seconds(10))
        } throws: { error in
            "\(error)".contains("the schema is version \(known + 1), which a kora-sidecar knowing \(known) versions cannot read")
        }
        #expect(try await postgresSQL(url, "SELECT version FROM kora_schema_version") == [known + 1])
    }

    @Test func aSQLiteStoreLeftBehindBySwitchingToPostgreSQLIsAWarning() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        var storage = StorageConfiguration()
        storage.sqlitePath = directory + "/store.sqlite"
        storage.encryptionKeys = [EncryptionKeyEntry(id: "k1", key: Secret(String(repeating: "A", count: 43) + "="))]
        storage.postgresURL = Secret(try await PostgresServer.shared().createDatabase())
        let warning = "A SQLite store is still at storage.sqlitePath, but the store is PostgreSQL"

        let logs = TestLogs()
        _ = try storage.open(logger: logs.logger())
        #expect(!logs.all.contains { $0.contains(warning) })

        try SQLiteStore(path: storage.sqlitePath, protection: .sealedForTests).close()
        let after = TestLogs()
        _ = try storage.open(logger: after.logger())
        #expect(after.all.contains { $0.hasPrefix("warning \(warning)") && $0.contains("path=\(storage.sqlitePath)") })
    }
}
