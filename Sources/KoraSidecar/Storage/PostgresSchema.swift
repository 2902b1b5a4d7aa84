#if PostgreSQL
import KoraSidecarCore
import Logging
import PostgresNIO

/// The PostgreSQL schema, versioned: tables carry a `kora_` prefix so that the sidecar can share a
/// database with an application.
enum PostgresSchema {
    /// One entry per version, each a list of single statements; a new version is appended, never edited.
    static let migrations: [[String]] = [
        [
            "CREATE TABLE kora_seen_events(event_id TEXT PRIMARY KEY, seen_at BIGINT NOT NULL)",
            "CREATE INDEX kora_seen_events_seen_at ON kora_seen_events(seen_at)",
            """
            CREATE TABLE kora_events(
                id BIGSERIAL PRIMARY KEY, event_id TEXT NOT NULL, type TEXT NOT NULL, verification_id TEXT,
                normalized BYTEA NOT NULL, original BYTEA NOT NULL, original_headers TEXT NOT NULL,
                signature_verified BOOLEAN NOT NULL, received_at BIGINT NOT NULL)
            """,
            """
            CREATE TABLE kora_deliveries(
                id BIGSERIAL PRIMARY KEY, event_row BIGINT NOT NULL REFERENCES kora_events(id), service TEXT NOT NULL,
                status TEXT NOT NULL, attempts BIGINT NOT NULL DEFAULT 0, next_attempt_at BIGINT NOT NULL,
                lease_until BIGINT, last_status BIGINT, last_error TEXT,
                created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL)
            """,
            "CREATE INDEX kora_deliveries_due ON kora_deliveries(service, status, next_attempt_at)",
            "CREATE INDEX kora_deliveries_event ON kora_deliveries(event_row)",
            "CREATE INDEX kora_deliveries_updated ON kora_deliveries(status, updated_at)",
            """
            CREATE TABLE kora_attempts(
                delivery_id BIGINT NOT NULL, attempt BIGINT NOT NULL, at BIGINT NOT NULL, status_code BIGINT,
                error TEXT, duration_ms BIGINT NOT NULL, PRIMARY KEY(delivery_id, attempt))
            """,
            """
            CREATE TABLE kora_quarantine(
                id BIGSERIAL PRIMARY KEY, received_at BIGINT NOT NULL, reason TEXT NOT NULL, body BYTEA NOT NULL,
                headers TEXT NOT NULL, signature_verified BOOLEAN NOT NULL)
            """,
            """
            CREATE TABLE kora_verification_origins(
                verification_id TEXT PRIMARY KEY, service TEXT NOT NULL, created_at BIGINT NOT NULL)
            """,
            "CREATE TABLE kora_health(id BIGINT PRIMARY KEY, checked_at BIGINT NOT NULL)",
        ],
        // Events that matched no service are kept (flagged) instead of dropped.
        [
            "ALTER TABLE kora_events ADD COLUMN unrouted BOOLEAN NOT NULL DEFAULT FALSE",
            "CREATE INDEX kora_events_unrouted ON kora_events(id) WHERE unrouted",
        ],
        // Delivery in order per verification looks for an earlier pending delivery of the same verification.
        ["CREATE INDEX kora_events_verification ON kora_events(verification_id) WHERE verification_id IS NOT NULL"],
        // Verification creates sent with Idempotency-Key, kept 24 h.
        [
            """
            CREATE TABLE kora_idempotency_keys(
                service TEXT NOT NULL, key TEXT NOT NULL, digest TEXT NOT NULL, state TEXT NOT NULL, status BIGINT,
                content_type TEXT, body BYTEA, created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL,
                PRIMARY KEY(service, key))
            """,
            "CREATE INDEX kora_idempotency_keys_created ON kora_idempotency_keys(created_at)",
        ],
        // The Kora key's budget, shared by the replicas.
        [
            "CREATE TABLE kora_budget_calls(sent_at BIGINT NOT NULL)",
            "CREATE INDEX kora_budget_calls_sent ON kora_budget_calls(sent_at)",
            "CREATE TABLE kora_budget_hold(id BIGINT PRIMARY KEY, held_until BIGINT NOT NULL)",
        ],
        // Bodies sealed (AES-256-GCM, `key_id` names the key), deleted after their retention or on erasure.
        [
            "ALTER TABLE kora_events ADD COLUMN sealed BYTEA, ADD COLUMN key_id TEXT, ADD COLUMN body_state TEXT NOT NULL DEFAULT 'kept'",
            "ALTER TABLE kora_quarantine ADD COLUMN sealed BYTEA, ADD COLUMN key_id TEXT, ADD COLUMN body_state TEXT NOT NULL DEFAULT 'kept'",
            "CREATE INDEX kora_events_kept ON kora_events(id) WHERE body_state = 'kept'",
        ],
        // Delivery in order looks up a verification's pending deliveries by index, not by walking its events.
        [
            "ALTER TABLE kora_deliveries ADD COLUMN verification_id TEXT",
            "UPDATE kora_deliveries d SET verification_id = e.verification_id FROM kora_events e WHERE e.id = d.event_row",
            """
            CREATE INDEX kora_deliveries_pending_verification ON kora_deliveries(service, verification_id, id)
                WHERE status = 'pending' AND verification_id IS NOT NULL
            """,
        ],
        // The oldest pending age counts from when an operator last made a delivery pending again.
        ["ALTER TABLE kora_deliveries ADD COLUMN pending_since BIGINT"],
        // A sealed or deleted body's plain columns are written NULL, not empty: a kora-sidecar from
        // before sealing, still running beside a newer one during a rolling update, read the empty
        // columns as the body and sent services an empty event; it now fails to read the row and
        // leaves it to the newer replicas. (Rows written empty before stay so: a database a version
        // that seals has written to has no such replica left, and rewriting every row would hold the
        // table's lock through a rolling update.) From here on the schema says which binaries may
        // read it (`oldest_reader`).
        [
            "ALTER TABLE kora_events ALTER COLUMN normalized DROP NOT NULL, ALTER COLUMN original DROP NOT NULL",
            "ALTER TABLE kora_quarantine ALTER COLUMN body DROP NOT NULL",
            "ALTER TABLE kora_schema_version ADD COLUMN oldest_reader BIGINT NOT NULL DEFAULT 0",
        ],
    ]

    /// The fewest migrations a kora-sidecar must know to read and write what this one writes. Raised
    /// by a migration that changes what existing columns mean (9: NULL bodies); an additive one
    /// leaves it, so that the binary before it can still run beside this one, or be rolled back to.
    static let oldestReader = 9

    /// The schema is newer than this binary can read: it must not serve from it.
    struct TooNew: Error, CustomStringConvertible {
        var version: Int
        var oldestReader: Int
        var description: String {
            "the schema is version \(version), which a kora-sidecar knowing \(migrations.count) versions cannot read "
                + "(it needs \(oldestReader) or more); run the newer kora-sidecar that migrated it"
        }
    }

    /// Any constant, the same in every replica: the advisory lock that serialises migrations.
    private static let migrationLock: Int64 = 0x4B6F_7261_5369_6465  // "KoraSide"

    /// Brings the schema to the newest version, inside the caller's transaction. Replicas starting
    /// at the same moment queue on an advisory lock, so each version is applied exactly once.
    static func migrate(_ connection: PostgresConnection, logger: Logger) async throws {
        // A migration may take longer than a store call, and waits for another replica's. A replica
        // cut off mid-migration gives its locks on the main tables back within a minute, not when TCP
        // gives up.
        try await connection.query("SET LOCAL statement_timeout = 0", logger: logger)
        try await connection.query("SET LOCAL lock_timeout = 0", logger: logger)
        try await connection.query("SET LOCAL idle_in_transaction_session_timeout = '60s'", logger: logger)
        try await connection.query("SELECT pg_advisory_xact_lock(\(migrationLock))", logger: logger)
        try await connection.query("CREATE TABLE IF NOT EXISTS kora_schema_version(version BIGINT NOT NULL)", logger: logger)
        let current = try await connection.query("SELECT version FROM kora_schema_version", logger: logger).collect()
            .first?.decode(Int64.self)
        let version = Int(current ?? 0)
        if version > migrations.count {
            // A newer replica migrated first (a rolling update): serve beside it if what it writes
            // is still readable here.
            let reader = try await connection.query("SELECT oldest_reader FROM kora_schema_version", logger: logger).collect()
                .first?.decode(Int64.self)
            if let reader, reader > migrations.count { throw TooNew(version: version, oldestReader: Int(reader)) }
            logger.warning("PostgreSQL schema is newer than this kora-sidecar", metadata: ["schema": "\(version)", "known": "\(migrations.count)"])
        }
        guard version < migrations.count else { return }
        for statements in migrations[version...] {
            for statement in statements { try await connection.query(PostgresQuery(unsafeSQL: statement), logger: logger) }
        }
        let newest = Int64(migrations.count), reader = Int64(oldestReader)
        if current == nil {
            try await connection.query("INSERT INTO kora_schema_version(version, oldest_reader) VALUES(\(newest), \(reader))", logger: logger)
        } else {
            try await connection.query(
                "UPDATE kora_schema_version SET version = \(newest), oldest_reader = GREATEST(oldest_reader, \(reader))", logger: logger)
        }
        logger.info("PostgreSQL schema migrated", metadata: ["from": "\(version)", "to": "\(newest)"])
    }
}
#endif
