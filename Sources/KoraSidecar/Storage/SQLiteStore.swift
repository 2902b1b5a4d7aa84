import KoraSidecarCore

/// The SQLite implementation of ``SidecarStore``: one file, WAL mode, every write committed to
/// disk before the caller continues; pure reads go to a reader connection and see the last commit.
final class SQLiteStore: SidecarStore {
    private let database: SQLiteDatabase
    private let protection: DataProtection

    /// The schema, one entry per version; a new version is appended, never edited.
    static let migrations = [
        """
        CREATE TABLE seen_events(event_id TEXT PRIMARY KEY, seen_at INTEGER NOT NULL) WITHOUT ROWID;
        CREATE INDEX seen_events_seen_at ON seen_events(seen_at);
        CREATE TABLE events(
            id INTEGER PRIMARY KEY, event_id TEXT NOT NULL, type TEXT NOT NULL, verification_id TEXT,
            normalized BLOB NOT NULL, original BLOB NOT NULL, original_headers TEXT NOT NULL,
            signature_verified INTEGER NOT NULL, received_at INTEGER NOT NULL);
        CREATE TABLE deliveries(
            id INTEGER PRIMARY KEY, event_row INTEGER NOT NULL REFERENCES events(id), service TEXT NOT NULL,
            status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at INTEGER NOT NULL,
            lease_until INTEGER, last_status INTEGER, last_error TEXT,
            created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);
        CREATE INDEX deliveries_due ON deliveries(service, status, next_attempt_at);
        CREATE INDEX deliveries_event ON deliveries(event_row);
        CREATE INDEX deliveries_updated ON deliveries(status, updated_at);
        CREATE TABLE attempts(
            delivery_id INTEGER NOT NULL, attempt INTEGER NOT NULL, at INTEGER NOT NULL, status_code INTEGER,
            error TEXT, duration_ms INTEGER NOT NULL, PRIMARY KEY(delivery_id, attempt)) WITHOUT ROWID;
        CREATE TABLE quarantine(
            id INTEGER PRIMARY KEY, received_at INTEGER NOT NULL, reason TEXT NOT NULL, body BLOB NOT NULL,
            headers TEXT NOT NULL, signature_verified INTEGER NOT NULL);
        CREATE TABLE verification_origins(
            verification_id TEXT PRIMARY KEY, service TEXT NOT NULL, created_at INTEGER NOT NULL) WITHOUT ROWID;
        CREATE TABLE health(id INTEGER PRIMARY KEY, checked_at INTEGER NOT NULL);
        """,
        // Events that matched no service are kept (flagged) instead of dropped.
        """
        ALTER TABLE events ADD COLUMN unrouted INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX events_unrouted ON events(unrouted, id) WHERE unrouted = 1;
        """,
        // Delivery in order per verification looks for an earlier pending delivery of the same verification.
        """
        CREATE INDEX events_verification ON events(verification_id) WHERE verification_id IS NOT NULL;
        """,
        // Verification creates sent with Idempotency-Key, kept 24 h.
        """
        CREATE TABLE idempotency_keys(
            service TEXT NOT NULL, key TEXT NOT NULL, digest TEXT NOT NULL, state TEXT NOT NULL, status INTEGER,
            content_type TEXT, body BLOB, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL,
            PRIMARY KEY(service, key)) WITHOUT ROWID;
        CREATE INDEX idempotency_keys_created ON idempotency_keys(created_at);
        """,
        // Bodies sealed (AES-256-GCM, `key_id` names the key), deleted after their retention or on erasure.
        """
        ALTER TABLE events ADD COLUMN sealed BLOB;
        ALTER TABLE events ADD COLUMN key_id TEXT;
        ALTER TABLE events ADD COLUMN body_state TEXT NOT NULL DEFAULT 'kept';
        ALTER TABLE quarantine ADD COLUMN sealed BLOB;
        ALTER TABLE quarantine ADD COLUMN key_id TEXT;
        ALTER TABLE quarantine ADD COLUMN body_state TEXT NOT NULL DEFAULT 'kept';
        CREATE INDEX events_kept ON events(id) WHERE body_state = 'kept';
        """,
        // Delivery in order looks up a verification's pending deliveries by index, not by walking its
        // events: a burst of one verification's events made each claim a scan of all of them.
        """
        ALTER TABLE deliveries ADD COLUMN verification_id TEXT;
        UPDATE deliveries SET verification_id = (SELECT verification_id FROM events WHERE events.id = deliveries.event_row);
        CREATE INDEX deliveries_pending_verification ON deliveries(service, verification_id, id)
            WHERE status = 'pending' AND verification_id IS NOT NULL;
        """,
        // The oldest pending age counts from when an operator last made a delivery pending again,
        // when later than its creation (NULL: never).
        """
        ALTER TABLE deliveries ADD COLUMN pending_since INTEGER;
        """,
        // SQLite gives a new row the largest id + 1: once the newest rows were erased or pruned, their
        // ids came back, and an alert's or a log line's delivery id then named another person's. The
        // largest id deleted is kept, and new ids start above it (``nextID(_:)``). (SQLite's
        // AUTOINCREMENT does the same, but only for a table created with it: adding it would rebuild
        // these tables, copying every row of a store at its first start after the upgrade.)
        """
        CREATE TABLE id_floors(name TEXT PRIMARY KEY, floor INTEGER NOT NULL) WITHOUT ROWID;
        INSERT INTO id_floors VALUES
            ('events', COALESCE((SELECT max(id) FROM events), 0)), ('deliveries', COALESCE((SELECT max(id) FROM deliveries), 0)),
            ('quarantine', COALESCE((SELECT max(id) FROM quarantine), 0));
        CREATE TRIGGER events_floor AFTER DELETE ON events
            BEGIN UPDATE id_floors SET floor = OLD.id WHERE name = 'events' AND floor < OLD.id; END;
        CREATE TRIGGER deliveries_floor AFTER DELETE ON deliveries
            BEGIN UPDATE id_floors SET floor = OLD.id WHERE name = 'deliveries' AND floor < OLD.id; END;
        CREATE TRIGGER quarantine_floor AFTER DELETE ON quarantine
            BEGIN UPDATE id_floors SET floor = OLD.id WHERE name = 'quarantine' AND floor < OLD.id; END;
        """,
        // Settled deliveries (delivered, dead) are counted as they change, not at each scrape: they are
        // kept for weeks, and counting them was a scan of every delivery, about half a second of CPU
        // per scrape for two million. Triggers keep the counts in the writes' own transactions, so
        // every writer (a `deliveries` command, an older version rolled back to) keeps them right.
        // A delivery is always created pending: only a change or a deletion moves the counts.
        """
        CREATE TABLE delivery_counts(
            service TEXT NOT NULL, status TEXT NOT NULL, count INTEGER NOT NULL, PRIMARY KEY(service, status)) WITHOUT ROWID;
        INSERT INTO delivery_counts SELECT service, status, COUNT(*) FROM deliveries WHERE status != 'pending' GROUP BY service, status;
        CREATE TRIGGER delivery_counts_delete AFTER DELETE ON deliveries WHEN OLD.status != 'pending'
            BEGIN UPDATE delivery_counts SET count = count - 1 WHERE service = OLD.service AND status = OLD.status; END;
        CREATE TRIGGER delivery_counts_update AFTER UPDATE OF service, status ON deliveries
            WHEN (OLD.service != NEW.service OR OLD.status != NEW.status) AND (OLD.status != 'pending' OR NEW.status != 'pending')
            BEGIN
                UPDATE delivery_counts SET count = count - 1 WHERE OLD.status != 'pending' AND service = OLD.service AND status = OLD.status;
                INSERT INTO delivery_counts SELECT NEW.service, NEW.status, 1 WHERE NEW.status != 'pending'
                    ON CONFLICT(service, status) DO UPDATE SET count = count + 1;
            END;
        """,
    ]

    /// The fewest migrations a kora-sidecar must know to use a store this one migrated. When a new
    /// migration only adds (a nullable column, a table, an index), keep this at the number before it:
    /// the version before can then still open the store, so that it can be rolled back to.
    /// (The last two add tables and triggers: the version that knew seven still opens the store.)
    static let oldestReader = 7

    /// The id a new row of `table` gets: above every id it has had, deleted ones included.
    private static func nextID(_ table: String) -> String {
        "(SELECT max(COALESCE((SELECT max(id) FROM \(table)), 0), (SELECT floor FROM id_floors WHERE name = '\(table)')) + 1)"
    }

    /// Opens (creating when needed) the store at `path`, sealing and keeping bodies as `protection` says.
    init(path: String, protection: DataProtection) throws {
        database = try SQLiteDatabase(path: path, migrations: Self.migrations, oldestReader: Self.oldestReader)
        self.protection = protection
    }

    /// Waits for queued writes and closes the file.
    func close() { database.close() }

    package func isDuplicate(eventID: String, since: UnixTime) async throws -> Bool {
        try await database.read { db in try Self.seen(db, eventID, since: since) }
    }

    private static func seen(_ db: SQLiteConnection, _ key: String, since: UnixTime) throws -> Bool {
        try !db.query("SELECT 1 FROM seen_events WHERE event_id = ? AND seen_at >= ?", [.text(key), .integer(since.milliseconds)]).isEmpty
    }

    package func remember(_ seen: [(eventID: String, at: UnixTime)]) async throws {
        try await database.write { db in
            for (eventID, at) in seen { try Self.remember(db, eventID, at) }
        }
    }

    private static func remember(_ db: SQLiteConnection, _ eventID: String, _ at: UnixTime) throws {
        try db.query(
            "INSERT INTO seen_events(event_id, seen_at) VALUES(?, ?) ON CONFLICT(event_id) DO UPDATE SET seen_at = max(seen_at, excluded.seen_at)",
            [.text(eventID), .integer(at.milliseconds)])
    }

    /// How long a webhook's write and the readiness check wait for their commit, as PostgreSQL's
    /// operations do: on a stalled disk they got no answer at all. Kora then gets its 503 and
    /// retries; a commit the disk finishes later makes the retry a duplicate, answered 200.
    static let operationTimeout = Duration.seconds(5)

    package func enqueue(_ event: KoraEvent, services: [String], at: UnixTime, dedupSince: UnixTime) async throws -> EnqueueResult {
        try await database.write(timeout: Self.operationTimeout) { db in try self.enqueue(db, event, services: services, at: at, dedupSince: dedupSince) }
    }

    private func enqueue(_ db: SQLiteConnection, _ event: KoraEvent, services: [String], at: UnixTime, dedupSince: UnixTime) throws
        -> EnqueueResult
    {
        for key in event.duplicateKeys where try Self.seen(db, key, since: dedupSince) { return .duplicate }
        for key in event.rememberedKeys { try Self.remember(db, key, at) }
        let body = self.protection.columns(for: event)
        try db.query(
            """
            INSERT INTO events(id, event_id, type, verification_id, normalized, original, original_headers, sealed, key_id,
                               signature_verified, received_at, unrouted)
            VALUES(\(Self.nextID("events")), ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            """,
            [
                .text(event.id), .text(event.type), .optional(event.verificationID), .blob(body.normalized),
                .blob(body.original), .text(body.headers), body.sealed.map(SQLiteValue.blob) ?? .null, .optional(body.keyID),
                .integer(event.signatureVerified ? 1 : 0), .integer(at.milliseconds), .integer(services.isEmpty ? 1 : 0),
            ])
        try Self.insertDeliveries(db, eventRow: db.lastInsertRowID, services: services, at: at)
        return .accepted
    }

    private static func insertDeliveries(_ db: SQLiteConnection, eventRow: Int64, services: [String], at: UnixTime) throws {
        for service in services {
            try db.query(
                """
                INSERT INTO deliveries(id, event_row, service, status, next_attempt_at, created_at, updated_at, verification_id)
                VALUES(\(Self.nextID("deliveries")), ?, ?, 'pending', ?, ?, ?, (SELECT verification_id FROM events WHERE id = ?))
                """,
                [
                    .integer(eventRow), .text(service), .integer(at.milliseconds), .integer(at.milliseconds), .integer(at.milliseconds),
                    .integer(eventRow),
                ])
        }
    }

    package func unrouted(limit: Int?) async throws -> [UnroutedEvent] {
        try await database.read { db in
            try db.query(
                """
                SELECT id, event_id, type, verification_id, received_at, signature_verified FROM events
                WHERE unrouted = 1 ORDER BY id DESC LIMIT ?
                """, [.int(limit ?? -1)]
            ).map { row in
                UnroutedEvent(
                    row: row.int(0), eventID: row.string(1), eventType: row.string(2), verificationID: row.optionalString(3),
                    receivedAt: UnixTime(milliseconds: row.int(4)), signatureVerified: row.int(5) != 0)
            }
        }
    }

    package func quarantinedCount() async throws -> Int {
        try await database.read { db in try Int(db.query("SELECT COUNT(*) FROM quarantine").first?.int(0) ?? 0) }
    }

    package func unroutedCount() async throws -> Int {
        try await database.read { db in try Int(db.query("SELECT COUNT(*) FROM events WHERE unrouted = 1").first?.int(0) ?? 0) }
    }

    package func route(_ assignments: [(eventRow: Int64, services: [String])], at: UnixTime) async throws -> Int {
        try await database.write { db in
            var created = 0
            for (row, services) in assignments where !services.isEmpty {
                try db.query("UPDATE events SET unrouted = 0 WHERE id = ? AND unrouted = 1", [.integer(row)])
                guard db.changes > 0 else { continue }
                try Self.insertDeliveries(db, eventRow: row, services: services, at: at)
                created += services.count
            }
            return created
        }
    }

    package func quarantine(_ payload: QuarantinedPayload) async throws {
        let body = protection.columns(for: payload)
        try await database.write { db in
            try db.query(
                "INSERT INTO quarantine(id, received_at, reason, body, headers, sealed, key_id, signature_verified) VALUES(\(Self.nextID("quarantine")), ?, ?, ?, ?, ?, ?, ?)",
                [
                    .integer(payload.receivedAt.milliseconds), .text(payload.reason), .blob(body.normalized), .text(body.headers),
                    body.sealed.map(SQLiteValue.blob) ?? .null, .optional(body.keyID), .integer(payload.signatureVerified ? 1 : 0),
                ])
        }
    }

    package func recordOrigin(verificationID: String, service: String, at: UnixTime) async throws {
        try await database.write { db in
            try db.query(
                "INSERT OR IGNORE INTO verification_origins(verification_id, service, created_at) VALUES(?, ?, ?)",
                [.text(verificationID), .text(service), .integer(at.milliseconds)])
        }
    }

    package func origin(ofVerification verificationID: String) async throws -> String? {
        try await database.read { db in
            try db.query("SELECT service FROM verification_origins WHERE verification_id = ?", [.text(verificationID)]).first?.string(0)
        }
    }

    package func claimDue(service: String, now: UnixTime, limit: Int, lease: Duration, ordered: Bool) async throws -> [DeliveryJob] {
        // A lease need not survive a crash: every start releases them (`releaseLeases`).
        try await database.write(durable: false) { db in
            try self.claimDue(db, service: service, now: now, limit: limit, lease: lease, ordered: ordered)
        }
    }

    @discardableResult
    package func finish(
        deliveryID: Int64, leasedUntil: UnixTime, attempt: AttemptRecord, next: NextStep, announcing: Announcement?
    ) async throws -> Bool {
        try await database.write { db in
            guard try self.finish(db, deliveryID: deliveryID, leasedUntil: leasedUntil, attempt: attempt, next: next) else { return false }
            if let announcing {
                _ = try self.enqueue(db, announcing.event, services: announcing.services, at: attempt.at, dedupSince: attempt.at)
            }
            return true
        }
    }

    func finishAndClaimNext(
        deliveryID: Int64, leasedUntil: UnixTime, attempt: AttemptRecord, next: NextStep, service: String, now: UnixTime, lease: Duration,
        ordered: Bool
    ) async throws -> (recorded: Bool, next: DeliveryJob?) {
        try await database.write { db in
            let recorded = try self.finish(db, deliveryID: deliveryID, leasedUntil: leasedUntil, attempt: attempt, next: next)
            return (recorded, try self.claimDue(db, service: service, now: now, limit: 1, lease: lease, ordered: ordered).first)
        }
    }

    /// With `ordered`, the condition that no earlier delivery of the same verification is pending
    /// for the same service (`d` is the delivery): one seek in the partial index of pending
    /// deliveries by service and verification, however many events the verification has.
    private static func inOrder(_ ordered: Bool) -> String {
        guard ordered else { return "" }
        return """
             AND (d.verification_id IS NULL OR NOT EXISTS (
                SELECT 1 FROM deliveries p
                WHERE p.service = d.service AND p.verification_id = d.verification_id AND p.status = 'pending' AND p.id < d.id))
            """
    }

    /// The event columns ``event(_:from:)`` reads, from `e`.
    private static let eventColumns = """
        e.event_id, e.type, e.verification_id, e.normalized, e.original, e.original_headers, e.sealed, e.key_id,
        e.body_state, e.signature_verified
        """

    /// The event in `row` from column `first` on (``eventColumns``), its body opened.
    private func event(_ row: SQLiteRow, from first: Int) -> (KoraEvent, BodyProblem?) {
        var event = KoraEvent(
            id: row.string(first), type: row.string(first + 1), verificationID: row.optionalString(first + 2), normalizedBody: [],
            originalBody: [], originalHeaders: [], signatureVerified: row.int(first + 9) != 0)
        let columns = BodyColumns(
            normalized: row.bytes(first + 3), original: row.bytes(first + 4), headers: row.string(first + 5),
            sealed: row.optionalBytes(first + 6), keyID: row.optionalString(first + 7))
        let problem = protection.open(columns, state: BodyState(rawValue: row.string(first + 8)) ?? .kept, into: &event)
        return (event, problem)
    }

    private func claimDue(
        _ db: SQLiteConnection, service: String, now: UnixTime, limit: Int, lease: Duration, ordered: Bool
    ) throws -> [DeliveryJob] {
        let rows = try db.query(
            """
            SELECT d.id, d.attempts, \(Self.eventColumns)
            FROM deliveries d JOIN events e ON e.id = d.event_row
            WHERE d.service = ? AND d.status = 'pending' AND d.next_attempt_at <= ?
              AND (d.lease_until IS NULL OR d.lease_until <= ?)\(Self.inOrder(ordered))
            ORDER BY d.next_attempt_at, d.id LIMIT ?
            """,
            [.text(service), .integer(now.milliseconds), .integer(now.milliseconds), .int(limit)])
        let leaseUntil = now.adding(lease)
        return try rows.map { row in
            try db.query("UPDATE deliveries SET lease_until = ? WHERE id = ?", [.integer(leaseUntil.milliseconds), .integer(row.int(0))])
            let (event, problem) = event(row, from: 2)
            return DeliveryJob(
                deliveryID: row.int(0), service: service, attempt: Int(row.int(1)) + 1, event: event, bodyProblem: problem, leaseUntil: leaseUntil)
        }
    }

    private func finish(_ db: SQLiteConnection, deliveryID: Int64, leasedUntil: UnixTime, attempt: AttemptRecord, next: NextStep) throws -> Bool {
        let (status, nextAt) = next.statusAndTime(after: attempt)
        try db.query(
            """
            UPDATE deliveries SET status = ?, attempts = ?, next_attempt_at = ?, lease_until = NULL,
                last_status = ?, last_error = ?, updated_at = ?
            WHERE id = ? AND lease_until = ?
            """,
            [
                .text(status.rawValue), .int(attempt.attempt), .integer(nextAt),
                attempt.statusCode.map(SQLiteValue.int) ?? .null, .optional(attempt.error),
                .integer(attempt.at.milliseconds), .integer(deliveryID), .integer(leasedUntil.milliseconds),
            ])
        // Its lease is no longer this worker's, or an erasure removed the delivery while it was being
        // sent: nothing is recorded.
        guard db.changes > 0 else { return false }
        try db.query(
            "INSERT OR REPLACE INTO attempts(delivery_id, attempt, at, status_code, error, duration_ms) VALUES (?, ?, ?, ?, ?, ?)",
            [
                .integer(deliveryID), .int(attempt.attempt), .integer(attempt.at.milliseconds),
                attempt.statusCode.map(SQLiteValue.int) ?? .null, .optional(attempt.error),
                .int(attempt.durationMilliseconds),
            ])
        // `payloadRetention` 0: the body goes as soon as its event's last delivery was delivered.
        if next == .delivered, protection.payloadRetention == .zero {
            _ = try Self.expireBodies(
                db, deliveredBefore: UnixTime(milliseconds: .max), deadBefore: attempt.at.adding(.zero - protection.deadRetention),
                ofDelivery: deliveryID, limit: 1)
        }
        return true
    }

    package func nextDueTime(service: String, ordered: Bool) async throws -> UnixTime? {
        try await database.read { db in
            try db.query(
                """
                SELECT MIN(MAX(d.next_attempt_at, COALESCE(d.lease_until, 0))) FROM deliveries d JOIN events e ON e.id = d.event_row
                WHERE d.service = ? AND d.status = 'pending'\(Self.inOrder(ordered))
                """,
                [.text(service)]
            ).first?.optionalInt(0).map(UnixTime.init(milliseconds:))
        }
    }

    package func releaseLeases() async throws {
        try await database.write { db in try db.query("UPDATE deliveries SET lease_until = NULL WHERE lease_until IS NOT NULL") }
    }

    private static let summaryColumns = """
        d.id, e.event_id, e.type, d.service, d.status, d.attempts, d.next_attempt_at, d.last_status, d.last_error,
        d.created_at, d.updated_at, e.verification_id FROM deliveries d JOIN events e ON e.id = d.event_row
        """

    private static func summary(_ row: SQLiteRow) -> DeliverySummary {
        let status = DeliveryStatus(rawValue: row.string(4)) ?? .pending
        return DeliverySummary(
            id: row.int(0), eventID: row.string(1), eventType: row.string(2), service: row.string(3), status: status,
            attempts: Int(row.int(5)), nextAttemptAt: status == .pending ? UnixTime(milliseconds: row.int(6)) : nil,
            lastStatusCode: row.optionalInt(7).map(Int.init), lastError: row.optionalString(8),
            createdAt: UnixTime(milliseconds: row.int(9)), updatedAt: UnixTime(milliseconds: row.int(10)),
            verificationID: row.optionalString(11))
    }

    package func deliveries(_ query: DeliveryQuery) async throws -> [DeliverySummary] {
        let (conditions, values) = Self.conditions(query.filter, before: query.before)
        return try await database.read { db in
            try db.query("SELECT \(Self.summaryColumns) WHERE \(conditions) ORDER BY d.id DESC LIMIT ?", values + [.int(query.limit)])
                .map(Self.summary)
        }
    }

    /// The SQL conditions of `filter` on `d` and `e`, and their values.
    private static func conditions(_ filter: DeliveryFilter, before: Int64? = nil) -> (String, [SQLiteValue]) {
        var conditions = filter.statuses.isEmpty ? ["1"] : ["d.status IN (\(filter.statuses.map { _ in "?" }.joined(separator: ", ")))"]
        var values: [SQLiteValue] = filter.statuses.map { .text($0.rawValue) }
        for (condition, value) in [
            ("d.service = ?", filter.service.map(SQLiteValue.text)), ("e.type = ?", filter.eventType.map(SQLiteValue.text)),
            ("e.verification_id = ?", filter.verificationID.map(SQLiteValue.text)), ("e.event_id = ?", filter.eventID.map(SQLiteValue.text)),
            ("d.created_at >= ?", filter.since.map { SQLiteValue.integer($0.milliseconds) }),
            ("d.created_at < ?", filter.until.map { SQLiteValue.integer($0.milliseconds) }),
            ("d.id < ?", before.map(SQLiteValue.integer)),
        ] {
            guard let value else { continue }
            conditions.append(condition)
            values.append(value)
        }
        return (conditions.joined(separator: " AND "), values)
    }

    package func delivery(id: Int64) async throws -> DeliveryDetail? {
        try await database.read { db in
            guard let row = try db.query("SELECT \(Self.summaryColumns) WHERE d.id = ?", [.integer(id)]).first else { return nil }
            let attempts = try db.query(
                "SELECT attempt, at, status_code, error, duration_ms FROM attempts WHERE delivery_id = ? ORDER BY attempt",
                [.integer(id)]
            ).map { row in
                AttemptRecord(
                    attempt: Int(row.int(0)), at: UnixTime(milliseconds: row.int(1)), statusCode: row.optionalInt(2).map(Int.init),
                    error: row.optionalString(3), durationMilliseconds: Int(row.int(4)))
            }
            let eventRow = try db.query(
                "SELECT \(Self.eventColumns) FROM deliveries d JOIN events e ON e.id = d.event_row WHERE d.id = ?", [.integer(id)])
            let (event, problem) = self.event(eventRow[0], from: 0)
            return DeliveryDetail(summary: Self.summary(row), attempts: attempts, event: problem.map { .failure($0) } ?? .success(event))
        }
    }

    package func quarantined(limit: Int) async throws -> [QuarantinedPayload] {
        try await database.read { db in
            try db.query("\(Self.quarantineSelect) ORDER BY id DESC LIMIT ?", [.int(limit)]).map(self.quarantined)
        }
    }

    /// The columns ``quarantined(_:)`` reads.
    private static let quarantineSelect =
        "SELECT id, received_at, reason, body, headers, sealed, key_id, body_state, signature_verified FROM quarantine"

    private func quarantined(_ row: SQLiteRow) -> QuarantinedPayload {
        var payload = QuarantinedPayload(
            id: row.int(0), receivedAt: UnixTime(milliseconds: row.int(1)), reason: row.string(2), body: [], headers: [:],
            signatureVerified: row.int(8) != 0)
        let columns = BodyColumns(
            normalized: row.bytes(3), original: [], headers: row.string(4), sealed: row.optionalBytes(5), keyID: row.optionalString(6))
        payload.bodyProblem = protection.open(columns, state: BodyState(rawValue: row.string(7)) ?? .kept, into: &payload)
        return payload
    }

    package func requeue(id: Int64, at: UnixTime) async throws -> Bool {
        try await database.write { db in
            try db.query(
                """
                UPDATE deliveries SET \(OutboxSQL.requeue(at: "?1"))
                WHERE id = ?2 AND status != 'delivered' AND (SELECT body_state FROM events WHERE id = deliveries.event_row) = 'kept'
                """,
                [.integer(at.milliseconds), .integer(id)])
            return db.changes > 0
        }
    }

    package func requeue(_ filter: DeliveryFilter, at: UnixTime, dryRun: Bool) async throws -> RequeueCount {
        let (conditions, values) = Self.conditions(filter)
        let selection = "SELECT d.id FROM deliveries d JOIN events e ON e.id = d.event_row WHERE \(conditions) AND e.body_state = 'kept'"
        let gone = "SELECT COUNT(*) FROM deliveries d JOIN events e ON e.id = d.event_row WHERE \(conditions) AND e.body_state != 'kept'"
        if dryRun {
            return try await database.read { db in
                RequeueCount(selected: try db.query(selection, values).count, bodyGone: Int(try db.query(gone, values).first?.int(0) ?? 0))
            }
        }
        return try await database.write { db in
            let bodyGone = Int(try db.query(gone, values).first?.int(0) ?? 0)
            try db.query(
                "UPDATE deliveries SET \(OutboxSQL.requeue(at: "?1")) WHERE id IN (\(selection))",
                [.integer(at.milliseconds)] + values)
            return RequeueCount(selected: db.changes, bodyGone: bodyGone)
        }
    }

    package func expireBodies(deliveredBefore: UnixTime, deadBefore: UnixTime, limit: Int) async throws -> Int {
        try await database.write { db in
            try Self.expireBodies(db, deliveredBefore: deliveredBefore, deadBefore: deadBefore, ofDelivery: nil, limit: limit)
        }
    }

    /// Deletes the bodies ``expireBodies(deliveredBefore:deadBefore:limit:)`` selects; only of the
    /// event of delivery `ofDelivery` when given.
    private static func expireBodies(
        _ db: SQLiteConnection, deliveredBefore: UnixTime, deadBefore: UnixTime, ofDelivery: Int64?, limit: Int
    ) throws -> Int {
        // One delivery's event is looked up by its id: `?1 IS NULL OR id = …` read every kept event
        // instead, on each delivery with `payloadRetention` 0.
        let candidate = ofDelivery == nil ? "" : "id = (SELECT event_row FROM deliveries WHERE id = ?1) AND"
        try db.query(
            """
            UPDATE events SET normalized = x'', original = x'', original_headers = '[]', sealed = NULL, key_id = NULL, body_state = 'expired'
            WHERE id IN (
                SELECT id FROM events WHERE \(candidate) body_state = 'kept' AND unrouted = 0
                  AND EXISTS (SELECT 1 FROM deliveries d WHERE d.event_row = events.id)
                  AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_row = events.id AND (d.status = 'pending'
                      OR (d.status = 'delivered' AND d.updated_at >= ?2) OR (d.status = 'dead' AND d.updated_at >= ?3)))
                LIMIT ?4)
            """, [ofDelivery.map(SQLiteValue.integer) ?? .null, .integer(deliveredBefore.milliseconds), .integer(deadBefore.milliseconds), .int(limit)])
        return db.changes
    }

    package func keptEvents(after: Int64, limit: Int) async throws -> (bodies: [KeptBody], last: Int64?) {
        try await database.read { db in
            let rows = try db.query(
                "SELECT e.id, \(Self.eventColumns) FROM events e WHERE e.id > ? AND e.body_state = 'kept' ORDER BY e.id LIMIT ?",
                [.integer(after), .int(limit)])
            let bodies = rows.compactMap { row -> KeptBody? in
                let (event, problem) = self.event(row, from: 1)
                return problem == nil ? KeptBody(owner: .event(id: event.id, verificationID: event.verificationID), body: event.normalizedBody) : nil
            }
            return (bodies, rows.last?.int(0))
        }
    }

    package func keptQuarantined() async throws -> [KeptBody] {
        try await database.read { db in
            try db.query("\(Self.quarantineSelect) WHERE body_state = 'kept'").map(self.quarantined).filter { $0.bodyProblem == nil }.map { KeptBody(owner: .quarantine($0.id), body: $0.body) }
        }
    }

    package func erase(verificationIDs: [String], eventIDs: [String], quarantineIDs: [Int64], mentions: [[UInt8]]) async throws -> ErasureReport {
        try await database.write { db in
            var report = ErasureReport(verificationIDs: verificationIDs)
            /// Deletes the events `condition` selects (with `value`), their deliveries and attempts.
            func deleteEvents(where condition: String, _ value: String) throws {
                let rows = "SELECT id FROM events WHERE \(condition)"
                try db.query("DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM deliveries WHERE event_row IN (\(rows)))", [.text(value)])
                try db.query("DELETE FROM deliveries WHERE event_row IN (\(rows))", [.text(value)])
                report.deliveries += db.changes
                try db.query("DELETE FROM events WHERE \(condition)", [.text(value)])
                report.events += db.changes
            }
            for id in verificationIDs {
                try deleteEvents(where: "verification_id = ?", id)
                try db.query("DELETE FROM verification_origins WHERE verification_id = ?", [.text(id)])
                report.origins += db.changes
            }
            for id in eventIDs {
                try deleteEvents(where: "event_id = ? AND verification_id IS NULL", id)
            }
            // Kora's answer to a create names the verification and the person.
            for mention in mentions {
                try db.query("DELETE FROM idempotency_keys WHERE instr(body, ?) > 0", [.blob(mention)])
                report.idempotencyKeys += db.changes
            }
            for id in quarantineIDs {
                try db.query("DELETE FROM quarantine WHERE id = ?", [.integer(id)])
                report.quarantined += db.changes
            }
            return report
        }
    }

    package func resealEvents(after: Int64) async throws -> (report: ResealReport, last: Int64?) {
        guard let current = protection.sealer?.sealingKeyID else { return (ResealReport(), nil) }
        return try await database.write { db in
            let rows = try db.query(
                "SELECT e.id, \(Self.eventColumns) FROM events e WHERE e.id > ? AND e.body_state = 'kept' AND e.key_id IS NOT ? ORDER BY e.id LIMIT 200",
                [.integer(after), .text(current)])
            var report = ResealReport()
            for row in rows {
                let (event, problem) = self.event(row, from: 1)
                guard problem == nil else {
                    report.unreadable += 1
                    continue
                }
                let body = self.protection.columns(for: event)
                try db.query(
                    "UPDATE events SET normalized = ?, original = ?, original_headers = ?, sealed = ?, key_id = ? WHERE id = ?",
                    [.blob(body.normalized), .blob(body.original), .text(body.headers), body.sealed.map(SQLiteValue.blob) ?? .null,
                     .optional(body.keyID), .integer(row.int(0))])
                report.resealed += 1
            }
            return (report, rows.last?.int(0))
        }
    }

    package func resealQuarantined() async throws -> ResealReport {
        guard let current = protection.sealer?.sealingKeyID else { return ResealReport() }
        return try await database.write { db in
            var report = ResealReport()
            let rows = try db.query("\(Self.quarantineSelect) WHERE body_state = 'kept' AND key_id IS NOT ?", [.text(current)])
            for payload in rows.map(self.quarantined) {
                guard payload.bodyProblem == nil else {
                    report.unreadable += 1
                    continue
                }
                let body = self.protection.columns(for: payload)
                try db.query(
                    "UPDATE quarantine SET body = ?, headers = ?, sealed = ?, key_id = ? WHERE id = ?",
                    [.blob(body.normalized), .text(body.headers), body.sealed.map(SQLiteValue.blob) ?? .null, .optional(body.keyID),
                     .integer(payload.id)])
                report.resealed += 1
            }
            return report
        }
    }

    package func prune(deliveredBefore: UnixTime, seenBefore: UnixTime, limit: Int) async throws -> PruneResult {
        try await database.write { db in
            let delivered = try db.query(
                "SELECT id, event_row FROM deliveries WHERE status = 'delivered' AND updated_at < ? LIMIT ?",
                [.integer(deliveredBefore.milliseconds), .int(limit)])
            for row in delivered {
                try db.query("DELETE FROM attempts WHERE delivery_id = ?", [.integer(row.int(0))])
                try db.query("DELETE FROM deliveries WHERE id = ?", [.integer(row.int(0))])
            }
            let deliveries = delivered.count
            // The events of the deliveries just deleted, once they have no other: found by their ids, not
            // by a scan of every event, which held the writer for seconds once a week of events was kept.
            var events = 0
            for eventRow in Set(delivered.map { $0.int(1) }) {
                try db.query("DELETE FROM events WHERE id = ? AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_row = ?)", [.integer(eventRow), .integer(eventRow)])
                events += db.changes
            }
            let seen: [SQLiteValue] = [.integer(seenBefore.milliseconds), .int(limit)]
            // An unrouted event has no delivery yet: it is kept like a quarantined payload, then goes.
            try db.query(
                """
                DELETE FROM events WHERE id IN (SELECT id FROM events WHERE unrouted = 1 AND received_at < ?1
                    AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_row = events.id) LIMIT ?2)
                """, seen)
            events += db.changes
            try db.query("DELETE FROM seen_events WHERE event_id IN (SELECT event_id FROM seen_events WHERE seen_at < ?1 LIMIT ?2)", seen)
            let seenIDs = db.changes
            try db.query("DELETE FROM quarantine WHERE id IN (SELECT id FROM quarantine WHERE received_at < ?1 LIMIT ?2)", seen)
            let more = [deliveries, events, seenIDs, db.changes].contains { $0 >= limit }
            return PruneResult(deliveries: deliveries, seenIDs: seenIDs, more: more)
        }
    }

    package func depth() async throws -> [OutboxDepth] {
        // Pending deliveries are counted through their index (few, but for an outage, and their
        // oldest is needed); settled ones are kept counted (`delivery_counts`).
        try await database.scan { db in
            try db.query(
                """
                SELECT service, status, COUNT(*), MIN(COALESCE(pending_since, created_at)) FROM deliveries WHERE status = 'pending' GROUP BY service
                UNION ALL SELECT service, status, count, NULL FROM delivery_counts WHERE count > 0
                """
            ).compactMap { row in
                guard let status = DeliveryStatus(rawValue: row.string(1)) else { return nil }
                return OutboxDepth(
                    service: row.string(0), status: status, count: Int(row.int(2)),
                    oldestSince: row.optionalInt(3).map(UnixTime.init(milliseconds:)))
            }
        }
    }

    private static func idempotencyRecord(_ db: SQLiteConnection, service: String, key: String) throws -> IdempotencyRecord? {
        try db.query(
            "SELECT digest, state, status, content_type, body, created_at, updated_at FROM idempotency_keys WHERE service = ? AND key = ?",
            [.text(service), .text(key)]
        ).first.map { row in
            IdempotencyRecord.decode(
                digest: row.string(0), state: row.string(1), status: row.optionalInt(2).map(Int.init), contentType: row.optionalString(3),
                body: row.optionalBytes(4), createdAt: row.int(5), updatedAt: row.int(6))
        }
    }

    package func idempotencyRecord(service: String, key: String) async throws -> IdempotencyRecord? {
        try await database.read { db in try Self.idempotencyRecord(db, service: service, key: key) }
    }

    package func claimIdempotencyKey(service: String, key: String, digest: String, at: UnixTime) async throws -> IdempotencyRecord? {
        try await database.write { db in
            if let existing = try Self.idempotencyRecord(db, service: service, key: key) { return existing }
            try db.query(
                "INSERT INTO idempotency_keys(service, key, digest, state, created_at, updated_at) VALUES(?, ?, ?, 'in_flight', ?, ?)",
                [.text(service), .text(key), .text(digest), .integer(at.milliseconds), .integer(at.milliseconds)])
            return nil
        }
    }

    package func takeOverIdempotencyKey(service: String, key: String, from record: IdempotencyRecord, at: UnixTime) async throws -> Bool {
        let values: [SQLiteValue] = [
            .integer(at.milliseconds), .text(service), .text(key), .text(record.state.name), .integer(record.updatedAt.milliseconds),
        ]
        return try await database.write { db in
            try db.query(
                """
                UPDATE idempotency_keys SET state = 'in_flight', status = NULL, content_type = NULL, body = NULL, updated_at = ?
                WHERE service = ? AND key = ? AND state = ? AND updated_at = ?
                """, values)
            return db.changes == 1
        }
    }

    package func settleIdempotencyKey(service: String, key: String, state: IdempotencyRecord.State, at: UnixTime) async throws {
        var status: SQLiteValue = .null
        var contentType: SQLiteValue = .null
        var body: SQLiteValue = .null
        if case .answered(let code, let type, let bytes) = state {
            status = .int(code)
            contentType = .optional(type)
            body = .blob(bytes)
        }
        let values: [SQLiteValue] = [.text(state.name), status, contentType, body, .integer(at.milliseconds), .text(service), .text(key)]
        try await database.write { db in
            try db.query(
                "UPDATE idempotency_keys SET state = ?, status = ?, content_type = ?, body = ?, updated_at = ? WHERE service = ? AND key = ?",
                values)
        }
    }

    package func pruneIdempotencyKeys(before: UnixTime, limit: Int) async throws -> Int {
        try await database.write { db in
            try db.query(
                """
                DELETE FROM idempotency_keys WHERE (service, key) IN (
                    SELECT service, key FROM idempotency_keys WHERE created_at < ?1 LIMIT ?2)
                """, [.integer(before.milliseconds), .int(limit)])
            return db.changes
        }
    }

    package func checkWritable(at: UnixTime) async throws {
        let free = try await database.write(timeout: Self.operationTimeout) { db in
            try db.query("INSERT OR REPLACE INTO health(id, checked_at) VALUES(1, ?)", [.integer(at.milliseconds)])
            return self.freeDiskBytesNow()
        }
        if let free, free < DiskSpace.minimumFreeBytes {
            throw StoreDiskFull(freeBytes: free)
        }
    }

    /// The bytes still free on the file system holding the store (a metric). Asked on a store
    /// thread: on a stalled disk `statvfs` blocks, and on the cooperative pool two scrapes blocked
    /// every task of the process.
    func freeDiskBytes() async throws -> UInt64? {
        try await database.scan { _ in self.freeDiskBytesNow() }
    }

    private func freeDiskBytesNow() -> UInt64? {
        let directory = folder(of: database.path)
        return DiskSpace.freeBytes(at: directory.isEmpty ? "." : directory)
    }
}

/// Header lists stored as a JSON array of `[name, value]` pairs.
enum HeaderList {
    static func encode(_ headers: [(name: String, value: String)]) -> String {
        String(decoding: JSONWriter.encode(.array(headers.map { [.string($0.name), .string($0.value)] })), as: UTF8.self)
    }

    static func decode(_ text: String) -> [(name: String, value: String)] {
        guard case .array(let pairs)? = try? JSONParser.parse(Array(text.utf8)) else { return [] }
        return pairs.compactMap { pair in
            guard case .array(let parts) = pair, parts.count == 2, case .string(let name) = parts[0], case .string(let value) = parts[1]
            else { return nil }
            return (name, value)
        }
    }
}
