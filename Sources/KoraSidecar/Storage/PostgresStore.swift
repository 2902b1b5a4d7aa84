#if PostgreSQL
import KoraSidecarCore
import Logging
import NIOConcurrencyHelpers
import NIOCore
import PostgresNIO
import ServiceLifecycle
import Synchronization

/// The PostgreSQL implementation of ``SidecarStore``, shared by several replicas.
///
/// Replicas cooperate through the database alone: de-duplication is an insert against a unique key,
/// deliveries are leased with `FOR UPDATE SKIP LOCKED`, and a replica that dies leaves leases that
/// expire. The store is a `Service`: `run()` keeps the connection pool and migrates the schema,
/// retrying until the database answers; until then every operation throws ``PostgresStoreError``.
final class PostgresStore: SidecarStore, Service {
    private let client: PostgresClient
    private let address: PostgresURL
    private let location: String
    private let logger: Logger
    /// Longest an operation waits, including for a connection, before it fails (the caller answers 503).
    private let operationTimeout: Duration
    /// Nil once the schema is current; else why the store cannot be used yet.
    private let notReady = NIOLockedValueBox<String?>("the schema is not migrated yet")
    private let protection: DataProtection

    /// Creates the store for `url`; nothing connects until ``run()``.
    convenience init(
        url: Secret, logger: Logger, operationTimeout: Duration = .seconds(5), protection: DataProtection = .plain
    ) throws(ConfigurationError) {
        let address: PostgresURL
        do {
            address = try PostgresURL(url)
        } catch {
            throw ConfigurationError(source: "storage.postgresURL", problems: [.init(path: "storage.postgresURL", reason: error.reason)])
        }
        self.init(address: address, logger: logger, operationTimeout: operationTimeout, protection: protection)
    }

    init(address: PostgresURL, logger: Logger, operationTimeout: Duration, protection: DataProtection) {
        // postgres-nio logs every row it reads at trace, and rows hold identity data: it is given
        // no level below info, whatever logging.level says.
        var logger = logger
        logger.logLevel = max(logger.logLevel, .info)
        client = PostgresClient(configuration: address.clientConfiguration, backgroundLogger: logger)
        self.address = address
        location = address.location
        self.logger = logger
        self.operationTimeout = operationTimeout
        self.protection = protection
    }

    /// Runs the connection pool and migrates the schema, until graceful shutdown or cancellation;
    /// then gives the pool a few seconds to close its connections, and no more.
    package func run() async {
        let pool = Task { await self.client.run() }
        await migrateUntilDone()
        try? await gracefulShutdown()
        pool.cancel()
        _ = try? await Deadline.run(after: .seconds(5), error: { CancellationError() }) { await pool.value }
    }

    /// Runs `body` with the store running, then stops it (one-shot commands and tests).
    func whileRunning<T: Sendable>(_ body: @Sendable (PostgresStore) async throws -> T) async throws -> T {
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { await self.run() }
            defer { group.cancelAll() }
            try await waitUntilMigrated()
            return try await body(self)
        }
    }

    /// Waits until the schema is current, or fails with why after `timeout` (the operation time-out).
    func waitUntilMigrated(timeout: Duration? = nil) async throws {
        let deadline = ContinuousClock.now + (timeout ?? operationTimeout)
        while let reason = notReady.withLockedValue({ $0 }) {
            guard ContinuousClock.now < deadline else { throw PostgresStoreError(location: location, reason: reason) }
            try await Task.sleep(for: .milliseconds(20))
        }
    }

    private func migrateUntilDone() async {
        var delay = Duration.milliseconds(100)
        while !Task.isCancelled, !Task.isShuttingDownGracefully {
            do {
                // On a connection of its own: the pool would keep a refusal to itself (the server
                // full, the role's connection limit) and the migration waiting for its turn.
                // Its id is outside the pool's, which count from 0, for the logs.
                let connection = try await PostgresConnection.connect(configuration: address.connectionConfiguration(), id: -1, logger: logger)
                do {
                    try await Self.transaction(connection, logger: logger) { try await PostgresSchema.migrate($0, logger: self.logger) }
                } catch {
                    try? await connection.close()
                    throw error
                }
                try? await connection.close()
                notReady.withLockedValue { $0 = nil }
                return
            } catch {
                let reason = PostgresStoreError.describe(error)
                notReady.withLockedValue { $0 = "the schema cannot be migrated: \(reason)" }
                logger.error("PostgreSQL schema migration failed; retrying", metadata: ["store": "\(location)", "error": "\(reason)"])
                try? await Task.sleep(for: delay)
                delay = min(delay * 2, .seconds(5))
            }
        }
    }

    // MARK: Running statements

    /// Runs `body` on a pooled connection within the operation time-out, turning every failure into
    /// a ``PostgresStoreError`` that says why without leaking the URL.
    private func withConnection<T: Sendable>(_ body: @escaping @Sendable (PostgresConnection) async throws -> T) async throws -> T {
        try await waitUntilMigrated()
        do {
            let location = self.location, timeout = operationTimeout
            return try await Deadline.run(
                after: timeout, error: { PostgresStoreError(location: location, reason: "no answer within \(timeout)") }
            ) { try await self.client.withConnection(body) }
        } catch let error as PostgresStoreError {
            throw error
        } catch let error as Duplicate {
            throw error
        } catch {
            throw PostgresStoreError(location: location, reason: PostgresStoreError.describe(error))
        }
    }

    private func inTransaction<T: Sendable>(_ body: @escaping @Sendable (PostgresConnection) async throws -> T) async throws -> T {
        let limits = Self.limits(operationTimeout)
        return try await withConnection { connection in
            try await Self.transaction(connection, logger: self.logger) { connection in
                try await connection.query(limits, logger: self.logger)
                return try await body(connection)
            }
        }
    }

    /// The server ends a transaction's statement that outlives the operation time-out too. Ending
    /// the wait for it is not enough: the query keeps its pooled connection until it answers, so a
    /// lock held by a stalled replica filled the pool with waiting statements, and every store call,
    /// intake included, failed. A transaction left idle (its replica cut off mid-way) gives its locks
    /// back. Set for the transaction only, which a pooler in front of PostgreSQL (PgBouncer) passes
    /// on, where it refuses them as connection parameters.
    private static func limits(_ timeout: Duration) -> PostgresQuery {
        let milliseconds = "\(timeout.milliseconds)", idle = "\(timeout.milliseconds * 6)"
        return """
            SELECT set_config('statement_timeout', \(milliseconds), true), set_config('lock_timeout', \(milliseconds), true),
                   set_config('idle_in_transaction_session_timeout', \(idle), true)
            """
    }

    /// BEGIN, `body`, COMMIT; ROLLBACK when `body` throws, whose error is rethrown as it is.
    private static func transaction<T: Sendable>(
        _ connection: PostgresConnection, logger: Logger, _ body: (PostgresConnection) async throws -> T
    ) async throws -> T {
        try await connection.query("BEGIN", logger: logger)
        let value: T
        do {
            value = try await body(connection)
        } catch {
            _ = try? await connection.query("ROLLBACK", logger: logger)
            throw error
        }
        try await connection.query("COMMIT", logger: logger)
        return value
    }

    private func rows(_ query: PostgresQuery) async throws -> [PostgresRow] {
        try await withConnection { connection in try await connection.query(query, logger: self.logger).collect() }
    }

    // MARK: De-duplication and events

    package func isDuplicate(eventID: String, since: UnixTime) async throws -> Bool {
        try await !rows("SELECT 1 FROM kora_seen_events WHERE event_id = \(eventID) AND seen_at >= \(since.milliseconds)").isEmpty
    }

    package func remember(_ seen: [(eventID: String, at: UnixTime)]) async throws {
        // One row per id: an upsert may not touch the same row twice.
        let latest = Dictionary(seen.map { ($0.eventID, $0.at.milliseconds) }, uniquingKeysWith: max)
        _ = try await rows(
            """
            INSERT INTO kora_seen_events(event_id, seen_at)
            SELECT * FROM unnest(\(Array(latest.keys))::text[], \(Array(latest.values))::bigint[])
            ON CONFLICT(event_id) DO UPDATE SET seen_at = GREATEST(kora_seen_events.seen_at, excluded.seen_at)
            """)
    }

    package func enqueue(_ event: KoraEvent, services: [String], at: UnixTime, dedupSince: UnixTime) async throws -> EnqueueResult {
        do {
            try await enqueueOrThrowDuplicate(event, services: services, at: at, dedupSince: dedupSince)
            return .accepted
        } catch is Duplicate {
            return .duplicate
        }
    }

    private func enqueueOrThrowDuplicate(_ event: KoraEvent, services: [String], at: UnixTime, dedupSince: UnixTime) async throws {
        try await inTransaction { connection in try await self.insert(connection, event, services: services, at: at, dedupSince: dedupSince) }
    }

    /// Stores `event` and its deliveries in the transaction of `connection`.
    /// - Throws: ``Duplicate`` when one of its keys was seen since `dedupSince` (thrown out of the
    ///   transaction, it undoes the keys claimed before).
    private func insert(_ connection: PostgresConnection, _ event: KoraEvent, services: [String], at: UnixTime, dedupSince: UnixTime) async throws {
        // Keys that only make this one a duplicate (a verified copy, for an unverified event) are read, not claimed.
        let readOnly = event.duplicateKeys.filter { !event.rememberedKeys.contains($0) }
        if !readOnly.isEmpty {
            let seen = try await connection.query(
                "SELECT 1 FROM kora_seen_events WHERE event_id = ANY(\(readOnly)) AND seen_at >= \(dedupSince.milliseconds)",
                logger: self.logger
            ).collect()
            if !seen.isEmpty { throw Duplicate() }
        }
        for key in event.rememberedKeys {
            // Atomic across replicas: a concurrent insert of the same key waits for this one's
            // commit and then finds the key taken, so exactly one replica accepts the event.
            let claimed = try await connection.query(
                """
                INSERT INTO kora_seen_events(event_id, seen_at) VALUES(\(key), \(at.milliseconds))
                ON CONFLICT(event_id) DO UPDATE SET seen_at = excluded.seen_at
                WHERE kora_seen_events.seen_at < \(dedupSince.milliseconds)
                RETURNING 1
                """, logger: self.logger
            ).collect()
            if claimed.isEmpty { throw Duplicate() }
        }
        let body = self.protection.columns(for: event)
        let eventRow = try await connection.query(
            """
            INSERT INTO kora_events(event_id, type, verification_id, normalized, original, original_headers, sealed, key_id,
                                    signature_verified, received_at, unrouted)
            VALUES(\(event.id), \(event.type), \(event.verificationID), \(body.plainNormalized),
                   \(body.plainOriginal), \(body.headers), \(body.sealed.map { ByteBuffer(bytes: $0) }), \(body.keyID),
                   \(event.signatureVerified), \(at.milliseconds), \(services.isEmpty))
            RETURNING id
            """, logger: self.logger
        ).collect().first?.decode(Int64.self) ?? 0
        try await Self.insertDeliveries(connection, eventRow: eventRow, services: services, at: at, logger: self.logger)
    }

    private static func insertDeliveries(
        _ connection: PostgresConnection, eventRow: Int64, services: [String], at: UnixTime, logger: Logger
    ) async throws {
        guard !services.isEmpty else { return }
        try await connection.query(
            """
            INSERT INTO kora_deliveries(event_row, service, status, next_attempt_at, created_at, updated_at, verification_id)
            SELECT \(eventRow), service, 'pending', \(at.milliseconds), \(at.milliseconds), \(at.milliseconds),
                   (SELECT verification_id FROM kora_events WHERE id = \(eventRow))
            FROM unnest(\(services)::text[]) AS service
            """, logger: logger)
    }

    package func unrouted(limit: Int?) async throws -> [UnroutedEvent] {
        let limitClause = limit.map { "LIMIT \($0)" } ?? ""
        return try await rows(
            """
            SELECT id, event_id, type, verification_id, received_at, signature_verified FROM kora_events
            WHERE unrouted ORDER BY id DESC \(unescaped: limitClause)
            """
        ).map { row in
            let (id, eventID, type, verificationID, receivedAt, verified) = try row.decode((Int64, String, String, String?, Int64, Bool).self)
            return UnroutedEvent(
                row: id, eventID: eventID, eventType: type, verificationID: verificationID, receivedAt: UnixTime(milliseconds: receivedAt),
                signatureVerified: verified)
        }
    }

    package func quarantinedCount() async throws -> Int {
        try await Int(rows("SELECT COUNT(*) FROM kora_quarantine").first?.decode(Int64.self) ?? 0)
    }

    package func unroutedCount() async throws -> Int {
        try await Int(rows("SELECT COUNT(*) FROM kora_events WHERE unrouted").first?.decode(Int64.self) ?? 0)
    }

    package func route(_ assignments: [(eventRow: Int64, services: [String])], at: UnixTime) async throws -> Int {
        let assignments = assignments.filter { !$0.services.isEmpty }
        return try await inTransaction { connection in
            var created = 0
            for (row, services) in assignments {
                // Only one replica or command routes an event: the flag is cleared once, under the row lock.
                let claimed = try await connection.query(
                    "UPDATE kora_events SET unrouted = FALSE WHERE id = \(row) AND unrouted RETURNING id", logger: self.logger
                ).collect()
                guard !claimed.isEmpty else { continue }
                try await Self.insertDeliveries(connection, eventRow: row, services: services, at: at, logger: self.logger)
                created += services.count
            }
            return created
        }
    }

    /// Rolls back an enqueue whose event was already seen.
    private struct Duplicate: Error {}

    package func quarantine(_ payload: QuarantinedPayload) async throws {
        let body = protection.columns(for: payload)
        _ = try await rows(
            """
            INSERT INTO kora_quarantine(received_at, reason, body, headers, sealed, key_id, signature_verified)
            VALUES(\(payload.receivedAt.milliseconds), \(payload.reason), \(body.plainNormalized), \(body.headers),
                   \(body.sealed.map { ByteBuffer(bytes: $0) }), \(body.keyID), \(payload.signatureVerified))
            """)
    }

    package func recordOrigin(verificationID: String, service: String, at: UnixTime) async throws {
        _ = try await rows(
            """
            INSERT INTO kora_verification_origins(verification_id, service, created_at) VALUES(\(verificationID), \(service), \(at.milliseconds))
            ON CONFLICT(verification_id) DO NOTHING
            """)
    }

    package func origin(ofVerification verificationID: String) async throws -> String? {
        try await rows("SELECT service FROM kora_verification_origins WHERE verification_id = \(verificationID)")
            .first?.decode(String.self)
    }

    // MARK: The outbox

    /// With `ordered`, the condition that no earlier delivery of the same verification is pending
    /// for the same service (`d` is the delivery): across replicas, since a leased delivery stays
    /// pending until its attempt is recorded; one seek in the partial index of pending deliveries.
    private static func inOrder(_ ordered: Bool) -> String {
        guard ordered else { return "" }
        return """
             AND (d.verification_id IS NULL OR NOT EXISTS (
                SELECT 1 FROM kora_deliveries p
                WHERE p.service = d.service AND p.verification_id = d.verification_id AND p.status = 'pending' AND p.id < d.id))
            """
    }

    package func claimDue(service: String, now: UnixTime, limit: Int, lease: Duration, ordered: Bool) async throws -> [DeliveryJob] {
        let leaseUntil = now.adding(lease).milliseconds
        // SKIP LOCKED: two replicas claiming at once take different rows, never the same one.
        return try await rows(
            """
            WITH due AS (
                SELECT d.id FROM kora_deliveries d JOIN kora_events e ON e.id = d.event_row
                WHERE d.service = \(service) AND d.status = 'pending' AND d.next_attempt_at <= \(now.milliseconds)
                  AND (d.lease_until IS NULL OR d.lease_until <= \(now.milliseconds))\(unescaped: Self.inOrder(ordered))
                ORDER BY d.next_attempt_at, d.id LIMIT \(limit)
                FOR UPDATE OF d SKIP LOCKED),
            leased AS (
                UPDATE kora_deliveries d SET lease_until = \(leaseUntil) FROM due WHERE d.id = due.id
                RETURNING d.id, d.attempts, d.event_row)
            SELECT l.id, l.attempts, \(unescaped: Self.eventColumns)
            FROM leased l JOIN kora_events e ON e.id = l.event_row ORDER BY l.id
            """
        ).map { row in
            let (id, attempts) = try row.decode((Int64, Int64).self)
            let (event, problem) = try self.event(row, from: 2)
            return DeliveryJob(
                deliveryID: id, service: service, attempt: Int(attempts) + 1, event: event, bodyProblem: problem,
                leaseUntil: UnixTime(milliseconds: leaseUntil))
        }
    }

    /// The event columns ``event(_:from:)`` reads, from `e`.
    private static let eventColumns = """
        e.event_id, e.type, e.verification_id, e.normalized, e.original, e.original_headers, e.sealed, e.key_id,
        e.body_state, e.signature_verified
        """

    /// The event in `row` from column `first` on (``eventColumns``), its body opened.
    private func event(_ row: PostgresRow, from first: Int) throws -> (KoraEvent, BodyProblem?) {
        let cells = row.makeRandomAccess()
        func cell<T: PostgresDecodable>(_ offset: Int, as type: T.Type = T.self) throws -> T { try cells[first + offset].decode(T.self) }
        var event = KoraEvent(
            id: try cell(0), type: try cell(1), verificationID: try cell(2), normalizedBody: [], originalBody: [], originalHeaders: [],
            signatureVerified: try cell(9))
        let columns = BodyColumns(
            normalized: try cell(3, as: ByteBuffer?.self).map { Array(buffer: $0) } ?? [],
            original: try cell(4, as: ByteBuffer?.self).map { Array(buffer: $0) } ?? [],
            headers: try cell(5), sealed: try cell(6, as: ByteBuffer?.self).map { Array(buffer: $0) }, keyID: try cell(7))
        let problem = protection.open(columns, state: BodyState(rawValue: try cell(8)) ?? .kept, into: &event)
        return (event, problem)
    }

    @discardableResult
    package func finish(
        deliveryID: Int64, leasedUntil: UnixTime, attempt: AttemptRecord, next: NextStep, announcing: Announcement?
    ) async throws -> Bool {
        let (status, nextAt) = next.statusAndTime(after: attempt)
        return try await inTransaction { connection in
            let updated = try await connection.query(
                """
                UPDATE kora_deliveries SET status = \(status.rawValue), attempts = \(attempt.attempt), next_attempt_at = \(nextAt),
                    lease_until = NULL, last_status = \(attempt.statusCode), last_error = \(attempt.error),
                    updated_at = \(attempt.at.milliseconds)
                WHERE id = \(deliveryID) AND lease_until = \(leasedUntil.milliseconds)
                RETURNING id
                """, logger: self.logger
            ).collect()
            // Its lease is another worker's now (on this replica or another), or an erasure removed the
            // delivery while it was being sent: nothing is recorded.
            guard !updated.isEmpty else { return false }
            try await connection.query(
                """
                INSERT INTO kora_attempts(delivery_id, attempt, at, status_code, error, duration_ms)
                VALUES (\(deliveryID), \(attempt.attempt), \(attempt.at.milliseconds), \(attempt.statusCode), \(attempt.error),
                       \(attempt.durationMilliseconds))
                ON CONFLICT(delivery_id, attempt) DO UPDATE SET at = excluded.at, status_code = excluded.status_code,
                    error = excluded.error, duration_ms = excluded.duration_ms
                """, logger: self.logger)
            // `payloadRetention` 0: the body goes as soon as its event's last delivery was delivered.
            if next == .delivered, self.protection.payloadRetention == .zero {
                _ = try await Self.expireBodies(
                    connection, deliveredBefore: UnixTime(milliseconds: .max),
                    deadBefore: attempt.at.adding(.zero - self.protection.deadRetention), ofDelivery: deliveryID, limit: 1, logger: self.logger)
            }
            if let announcing {
                // Its id is new, so never a duplicate; were it one, the result would stay recorded all the same.
                do {
                    try await self.insert(connection, announcing.event, services: announcing.services, at: attempt.at, dedupSince: attempt.at)
                } catch is Duplicate {}
            }
            return true
        }
    }

    package func nextDueTime(service: String, ordered: Bool) async throws -> UnixTime? {
        try await rows(
            """
            SELECT MIN(GREATEST(d.next_attempt_at, COALESCE(d.lease_until, 0))) FROM kora_deliveries d JOIN kora_events e ON e.id = d.event_row
            WHERE d.service = \(service) AND d.status = 'pending'\(unescaped: Self.inOrder(ordered))
            """
        ).first?.decode(Int64?.self).map(UnixTime.init(milliseconds:))
    }

    /// Does nothing: other replicas hold leases in this database, and a dead replica's leases expire.
    package func releaseLeases() async throws {}

    // MARK: Operators

    private static let summarySelect = """
        SELECT d.id, e.event_id, e.type, d.service, d.status, d.attempts, d.next_attempt_at, d.last_status, d.last_error,
        d.created_at, d.updated_at, e.verification_id FROM kora_deliveries d JOIN kora_events e ON e.id = d.event_row
        """

    private static func summary(_ row: PostgresRow) throws -> DeliverySummary {
        let (id, eventID, type, service, statusText, attempts, nextAt, lastStatus, lastError, created, updated, verificationID) = try row.decode(
            (Int64, String, String, String, String, Int64, Int64, Int64?, String?, Int64, Int64, String?).self)
        let status = DeliveryStatus(rawValue: statusText) ?? .pending
        return DeliverySummary(
            id: id, eventID: eventID, eventType: type, service: service, status: status, attempts: Int(attempts),
            nextAttemptAt: status == .pending ? UnixTime(milliseconds: nextAt) : nil, lastStatusCode: lastStatus.map(Int.init),
            lastError: lastError, createdAt: UnixTime(milliseconds: created), updatedAt: UnixTime(milliseconds: updated),
            verificationID: verificationID)
    }

    package func deliveries(_ query: DeliveryQuery) async throws -> [DeliverySummary] {
        try await rows(Self.selecting(query.filter, prefix: Self.summarySelect, suffix: "ORDER BY d.id DESC LIMIT \(query.limit)", before: query.before))
            .map(Self.summary)
    }

    package func delivery(id: Int64) async throws -> DeliveryDetail? {
        guard let row = try await rows("\(unescaped: Self.summarySelect) WHERE d.id = \(id)").first else { return nil }
        let attempts = try await rows(
            "SELECT attempt, at, status_code, error, duration_ms FROM kora_attempts WHERE delivery_id = \(id) ORDER BY attempt"
        ).map { row in
            let (attempt, at, statusCode, error, duration) = try row.decode((Int64, Int64, Int64?, String?, Int64).self)
            return AttemptRecord(
                attempt: Int(attempt), at: UnixTime(milliseconds: at), statusCode: statusCode.map(Int.init), error: error,
                durationMilliseconds: Int(duration))
        }
        let event = try await rows(
            "SELECT NULL, NULL, \(unescaped: Self.eventColumns) FROM kora_deliveries d JOIN kora_events e ON e.id = d.event_row WHERE d.id = \(id)"
        ).first.map { try self.event($0, from: 2) }
        let opened: Result<KoraEvent, BodyProblem> =
            switch event {
            case (let event, nil)?: .success(event)
            case (_, let problem?)?: .failure(problem)
            case nil: .failure(.erased)
            }
        return DeliveryDetail(summary: try Self.summary(row), attempts: attempts, event: opened)
    }

    private static let quarantineSelect = """
        SELECT id, received_at, reason, body, headers, sealed, key_id, body_state, signature_verified FROM kora_quarantine
        """

    private func quarantined(_ row: PostgresRow) throws -> QuarantinedPayload {
        let (id, receivedAt, reason, body, headers, sealed, keyID, state, verified) = try row.decode(
            (Int64, Int64, String, ByteBuffer?, String, ByteBuffer?, String?, String, Bool).self)
        var payload = QuarantinedPayload(
            id: id, receivedAt: UnixTime(milliseconds: receivedAt), reason: reason, body: [], headers: [:], signatureVerified: verified)
        let columns = BodyColumns(
            normalized: body.map { Array(buffer: $0) } ?? [], original: [], headers: headers, sealed: sealed.map { Array(buffer: $0) }, keyID: keyID)
        payload.bodyProblem = protection.open(columns, state: BodyState(rawValue: state) ?? .kept, into: &payload)
        return payload
    }

    package func quarantined(limit: Int) async throws -> [QuarantinedPayload] {
        try await rows("\(unescaped: Self.quarantineSelect) ORDER BY id DESC LIMIT \(limit)").map(quarantined)
    }

    /// A requeue locks its events (`FOR SHARE OF e`) while it checks that their bodies are kept: an
    /// expiry in progress then finishes first and the check sees it, and one that starts later skips
    /// those events. Reading `body_state` unlocked, a requeue could pass an event whose body was being
    /// deleted, and its delivery went dead at once, after the operator was told it was queued again.
    package func requeue(id: Int64, at: UnixTime) async throws -> Bool {
        try await !rows(
            """
            UPDATE kora_deliveries SET \(unescaped: OutboxSQL.requeue(at: String(at.milliseconds)))
            WHERE status != 'delivered' AND id IN (
                SELECT d.id FROM kora_deliveries d JOIN kora_events e ON e.id = d.event_row
                WHERE d.id = \(id) AND e.body_state = 'kept' FOR SHARE OF e)
            RETURNING id
            """
        ).isEmpty
    }

    package func requeue(_ filter: DeliveryFilter, at: UnixTime, dryRun: Bool) async throws -> RequeueCount {
        let select = "SELECT d.id FROM kora_deliveries d JOIN kora_events e ON e.id = d.event_row"
        let gone = try await rows(
            Self.selecting(filter, prefix: "SELECT COUNT(*) FROM kora_deliveries d JOIN kora_events e ON e.id = d.event_row", suffix: "AND e.body_state != 'kept'")
        ).first?.decode(Int64.self) ?? 0
        let query =
            dryRun
            ? Self.selecting(filter, prefix: select, suffix: "AND e.body_state = 'kept'")
            : Self.selecting(
                filter,
                prefix: """
                    UPDATE kora_deliveries SET \(OutboxSQL.requeue(at: String(at.milliseconds)))
                    WHERE id IN (\(select)
                    """,
                suffix: "AND e.body_state = 'kept' FOR SHARE OF e) RETURNING id")
        return RequeueCount(selected: try await rows(query).count, bodyGone: Int(gone))
    }

    package func expireBodies(deliveredBefore: UnixTime, deadBefore: UnixTime, limit: Int) async throws -> Int {
        try await inTransaction { connection in
            try await Self.expireBodies(
                connection, deliveredBefore: deliveredBefore, deadBefore: deadBefore, ofDelivery: nil, limit: limit, logger: self.logger)
        }
    }

    /// Deletes the bodies ``expireBodies(deliveredBefore:deadBefore:limit:)`` selects; only of the
    /// event of delivery `ofDelivery` when given. Runs in the caller's transaction, in two statements:
    /// the events are locked first, then checked again in the second statement, which sees every
    /// requeue committed meanwhile (one statement judged by its own start, and a requeue committed
    /// between that and the lock lost its body); a requeue still under way holds its events and is
    /// skipped.
    private static func expireBodies(
        _ connection: PostgresConnection, deliveredBefore: UnixTime, deadBefore: UnixTime, ofDelivery: Int64?, limit: Int, logger: Logger
    ) async throws -> Int {
        let expirable = """
            e.body_state = 'kept' AND NOT e.unrouted
              AND EXISTS (SELECT 1 FROM kora_deliveries d WHERE d.event_row = e.id)
              AND NOT EXISTS (SELECT 1 FROM kora_deliveries d WHERE d.event_row = e.id AND (d.status = 'pending'
                  OR (d.status = 'delivered' AND d.updated_at >= \(deliveredBefore.milliseconds))
                  OR (d.status = 'dead' AND d.updated_at >= \(deadBefore.milliseconds))))
            """
        let locked = try await connection.query(
            """
            SELECT e.id FROM kora_events e WHERE \(unescaped: expirable)
              AND (\(ofDelivery)::bigint IS NULL OR e.id = (SELECT event_row FROM kora_deliveries WHERE id = \(ofDelivery)))
            LIMIT \(limit) FOR UPDATE SKIP LOCKED
            """, logger: logger
        ).collect().map { try $0.decode(Int64.self) }
        guard !locked.isEmpty else { return 0 }
        return try await connection.query(
            """
            UPDATE kora_events e SET normalized = NULL, original = NULL, original_headers = '[]', sealed = NULL, key_id = NULL, body_state = 'expired'
            WHERE e.id = ANY(\(locked)::bigint[]) AND \(unescaped: expirable)
            RETURNING e.id
            """, logger: logger
        ).collect().count
    }

    package func keptEvents(after: Int64, limit: Int) async throws -> (bodies: [KeptBody], last: Int64?) {
        let rows = try await rows(
            "SELECT e.id, NULL, \(unescaped: Self.eventColumns) FROM kora_events e WHERE e.id > \(after) AND e.body_state = 'kept' ORDER BY e.id LIMIT \(limit)")
        let bodies = try rows.compactMap { row -> KeptBody? in
            let (event, problem) = try self.event(row, from: 2)
            return problem == nil ? KeptBody(owner: .event(id: event.id, verificationID: event.verificationID), body: event.normalizedBody) : nil
        }
        return (bodies, try rows.last.map { try $0.makeRandomAccess()[0].decode(Int64.self) })
    }

    package func keptQuarantined() async throws -> [KeptBody] {
        try await rows("\(unescaped: Self.quarantineSelect) WHERE body_state = 'kept'").map(quarantined)
            .filter { $0.bodyProblem == nil }.map { KeptBody(owner: .quarantine($0.id), body: $0.body) }
    }

    package func erase(verificationIDs: [String], eventIDs: [String], quarantineIDs: [Int64], mentions: [[UInt8]]) async throws -> ErasureReport {
        try await inTransaction { connection in
            var report = ErasureReport(verificationIDs: verificationIDs)
            func count(_ query: PostgresQuery) async throws -> Int { try await connection.query(query, logger: self.logger).collect().count }
            // The events about the verifications (by their index), and those about none named by their
            // id (a scan, only when there are such: an erasure by external id found some).
            var rows = try await connection.query(
                "SELECT id FROM kora_events WHERE verification_id = ANY(\(verificationIDs)::text[]) FOR UPDATE", logger: self.logger
            ).collect().map { try $0.decode(Int64.self) }
            if !eventIDs.isEmpty {
                rows += try await connection.query(
                    "SELECT id FROM kora_events WHERE verification_id IS NULL AND event_id = ANY(\(eventIDs)::text[]) FOR UPDATE", logger: self.logger
                ).collect().map { try $0.decode(Int64.self) }
            }
            _ = try await count(
                "DELETE FROM kora_attempts WHERE delivery_id IN (SELECT id FROM kora_deliveries WHERE event_row = ANY(\(rows)::bigint[])) RETURNING 1")
            report.deliveries = try await count("DELETE FROM kora_deliveries WHERE event_row = ANY(\(rows)::bigint[]) RETURNING 1")
            report.events = try await count("DELETE FROM kora_events WHERE id = ANY(\(rows)::bigint[]) RETURNING 1")
            report.origins = try await count(
                "DELETE FROM kora_verification_origins WHERE verification_id = ANY(\(verificationIDs)::text[]) RETURNING 1")
            // Kora's answer to a create names the verification and the person.
            for mention in mentions {
                report.idempotencyKeys += try await count(
                    "DELETE FROM kora_idempotency_keys WHERE position(\(ByteBuffer(bytes: mention)) in body) > 0 RETURNING 1")
            }
            report.quarantined = try await count("DELETE FROM kora_quarantine WHERE id = ANY(\(quarantineIDs)::bigint[]) RETURNING 1")
            return report
        }
    }

    package func resealEvents(after: Int64) async throws -> (report: ResealReport, last: Int64?) {
        guard let current = protection.sealer?.sealingKeyID else { return (ResealReport(), nil) }
        // FOR UPDATE keeps a replica's erasure or expiry of these rows from interleaving.
        return try await inTransaction { connection in
            let rows = try await connection.query(
                """
                SELECT e.id, NULL, \(unescaped: Self.eventColumns) FROM kora_events e
                WHERE e.id > \(after) AND e.body_state = 'kept' AND e.key_id IS DISTINCT FROM \(current) ORDER BY e.id LIMIT 200 FOR UPDATE
                """, logger: self.logger
            ).collect()
            var report = ResealReport()
            var last: Int64?
            for row in rows {
                let id = try row.makeRandomAccess()[0].decode(Int64.self)
                last = id
                let (event, problem) = try self.event(row, from: 2)
                guard problem == nil else {
                    report.unreadable += 1
                    continue
                }
                let body = self.protection.columns(for: event)
                try await connection.query(
                    """
                    UPDATE kora_events SET normalized = \(body.plainNormalized), original = \(body.plainOriginal),
                        original_headers = \(body.headers), sealed = \(body.sealed.map { ByteBuffer(bytes: $0) }), key_id = \(body.keyID)
                    WHERE id = \(id)
                    """, logger: self.logger)
                report.resealed += 1
            }
            return (report, last)
        }
    }

    package func resealQuarantined() async throws -> ResealReport {
        guard let current = protection.sealer?.sealingKeyID else { return ResealReport() }
        var report = ResealReport()
        let quarantined = try await rows("\(unescaped: Self.quarantineSelect) WHERE body_state = 'kept' AND key_id IS DISTINCT FROM \(current)")
            .map(quarantined)
        for payload in quarantined {
            guard payload.bodyProblem == nil else {
                report.unreadable += 1
                continue
            }
            let body = protection.columns(for: payload)
            _ = try await rows(
                """
                UPDATE kora_quarantine SET body = \(body.plainNormalized), headers = \(body.headers),
                    sealed = \(body.sealed.map { ByteBuffer(bytes: $0) }), key_id = \(body.keyID)
                WHERE id = \(payload.id)
                """)
            report.resealed += 1
        }
        return report
    }

    /// `prefix WHERE <filter> suffix`: each condition holds or its parameter is NULL, every value bound.
    private static func selecting(_ filter: DeliveryFilter, prefix: String, suffix: String, before: Int64? = nil) -> PostgresQuery {
        """
        \(unescaped: prefix)
        WHERE (cardinality(\(filter.statuses.map(\.rawValue))::text[]) = 0 OR d.status = ANY(\(filter.statuses.map(\.rawValue))::text[]))
          AND (\(before)::bigint IS NULL OR d.id < \(before))
          AND (\(filter.service)::text IS NULL OR d.service = \(filter.service))
          AND (\(filter.eventType)::text IS NULL OR e.type = \(filter.eventType))
          AND (\(filter.verificationID)::text IS NULL OR e.verification_id = \(filter.verificationID))
          AND (\(filter.eventID)::text IS NULL OR e.event_id = \(filter.eventID))
          AND (\(filter.since?.milliseconds)::bigint IS NULL OR d.created_at >= \(filter.since?.milliseconds))
          AND (\(filter.until?.milliseconds)::bigint IS NULL OR d.created_at < \(filter.until?.milliseconds))
        \(unescaped: suffix)
        """
    }

    package func prune(deliveredBefore: UnixTime, seenBefore: UnixTime, limit: Int) async throws -> PruneResult {
        try await inTransaction { connection in
            let before = deliveredBefore.milliseconds
            let seenCut = seenBefore.milliseconds
            // The conditions again on the rows deleted: PostgreSQL re-checks those (not the subquery)
            // after waiting for a row's lock, so a delivery an operator re-queued meanwhile stays.
            let deleted = try await connection.query(
                """
                DELETE FROM kora_deliveries WHERE status = 'delivered' AND updated_at < \(before) AND id IN
                    (SELECT id FROM kora_deliveries WHERE status = 'delivered' AND updated_at < \(before) LIMIT \(limit))
                RETURNING id, event_row
                """, logger: self.logger
            ).collect().map { try $0.decode((Int64, Int64).self) }
            let ids = deleted.map(\.0)
            if !ids.isEmpty { try await connection.query("DELETE FROM kora_attempts WHERE delivery_id = ANY(\(ids))", logger: self.logger) }
            // Routed events whose deliveries are all gone (those of the deliveries just deleted: found by
            // id, not by a scan of every event), then unrouted ones past the window: apart, so that an
            // unrouted event an operator routes meanwhile (no longer unrouted once its lock is
            // released) fails the re-check and stays with its new deliveries.
            let eventRows = Array(Set(deleted.map(\.1)))
            var events = 0
            if !eventRows.isEmpty {
                events += try await connection.query(
                    """
                    DELETE FROM kora_events e WHERE NOT unrouted AND id = ANY(\(eventRows))
                        AND NOT EXISTS (SELECT 1 FROM kora_deliveries d WHERE d.event_row = e.id)
                    RETURNING 1
                    """, logger: self.logger
                ).collect().count
            }
            events += try await connection.query(
                """
                DELETE FROM kora_events WHERE unrouted AND received_at < \(seenCut) AND id IN (SELECT e.id FROM kora_events e
                    WHERE unrouted AND received_at < \(seenCut) AND NOT EXISTS (SELECT 1 FROM kora_deliveries d WHERE d.event_row = e.id) LIMIT \(limit))
                RETURNING 1
                """, logger: self.logger
            ).collect().count
            let seen = try await connection.query(
                "DELETE FROM kora_seen_events WHERE seen_at < \(seenCut) AND event_id IN (SELECT event_id FROM kora_seen_events WHERE seen_at < \(seenCut) LIMIT \(limit)) RETURNING 1",
                logger: self.logger
            ).collect().count
            let quarantined = try await connection.query(
                "DELETE FROM kora_quarantine WHERE received_at < \(seenCut) AND id IN (SELECT id FROM kora_quarantine WHERE received_at < \(seenCut) LIMIT \(limit)) RETURNING 1",
                logger: self.logger
            ).collect().count
            return PruneResult(deliveries: ids.count, seenIDs: seen, more: [ids.count, events, seen, quarantined].contains { $0 >= limit })
        }
    }

    package func depth() async throws -> [OutboxDepth] {
        // Counted on the database's server, at each scrape: replicas keeping counts as SQLite does
        // would all update the same rows at every delivery's end.
        try await rows(
            """
            SELECT service, status, COUNT(*), MIN(COALESCE(pending_since, created_at)) FILTER (WHERE status = 'pending')
            FROM kora_deliveries GROUP BY service, status
            """
        ).compactMap { row in
            let (service, statusText, count, oldest) = try row.decode((String, String, Int64, Int64?).self)
            guard let status = DeliveryStatus(rawValue: statusText) else { return nil }
            return OutboxDepth(service: service, status: status, count: Int(count), oldestSince: oldest.map(UnixTime.init(milliseconds:)))
        }
    }

    package func idempotencyRecord(service: String, key: String) async throws -> IdempotencyRecord? {
        try await rows(
            """
            SELECT digest, state, status, content_type, body, created_at, updated_at FROM kora_idempotency_keys
            WHERE service = \(service) AND key = \(key)
            """
        ).first.map { row in
            let (digest, state, status, contentType, body, created, updated) = try row.decode(
                (String, String, Int64?, String?, ByteBuffer?, Int64, Int64).self)
            return IdempotencyRecord.decode(
                digest: digest, state: state, status: status.map(Int.init), contentType: contentType, body: body.map { Array(buffer: $0) },
                createdAt: created, updatedAt: updated)
        }
    }

    package func claimIdempotencyKey(service: String, key: String, digest: String, at: UnixTime) async throws -> IdempotencyRecord? {
        // The primary key makes one claim win across replicas; the others read what it left.
        let claimed = try await rows(
            """
            INSERT INTO kora_idempotency_keys(service, key, digest, state, created_at, updated_at)
            VALUES(\(service), \(key), \(digest), 'in_flight', \(at.milliseconds), \(at.milliseconds))
            ON CONFLICT(service, key) DO NOTHING RETURNING 1
            """)
        guard claimed.isEmpty else { return nil }
        return try await idempotencyRecord(service: service, key: key)
    }

    package func takeOverIdempotencyKey(service: String, key: String, from record: IdempotencyRecord, at: UnixTime) async throws -> Bool {
        try await rows(
            """
            UPDATE kora_idempotency_keys SET state = 'in_flight', status = NULL, content_type = NULL, body = NULL, updated_at = \(at.milliseconds)
            WHERE service = \(service) AND key = \(key) AND state = \(record.state.name) AND updated_at = \(record.updatedAt.milliseconds)
            RETURNING 1
            """
        ).count == 1
    }

    package func settleIdempotencyKey(service: String, key: String, state: IdempotencyRecord.State, at: UnixTime) async throws {
        var status: Int64?
        var contentType: String?
        var body: ByteBuffer?
        if case .answered(let code, let type, let bytes) = state {
            status = Int64(code)
            contentType = type
            body = ByteBuffer(bytes: bytes)
        }
        _ = try await rows(
            """
            UPDATE kora_idempotency_keys SET state = \(state.name), status = \(status), content_type = \(contentType), body = \(body),
                updated_at = \(at.milliseconds)
            WHERE service = \(service) AND key = \(key)
            """)
    }

    package func pruneIdempotencyKeys(before: UnixTime, limit: Int) async throws -> Int {
        try await rows(
            """
            DELETE FROM kora_idempotency_keys WHERE ctid IN (
                SELECT ctid FROM kora_idempotency_keys WHERE created_at < \(before.milliseconds) LIMIT \(limit))
            AND created_at < \(before.milliseconds) RETURNING 1
            """
        ).count
    }

    /// Also not ready once a newer replica migrated the schema past what this one can read: the check
    /// at start-up does not see a migration made while this replica runs (a rolling update).
    package func checkWritable(at: UnixTime) async throws {
        let schema = try await rows(
            """
            WITH health AS (
                INSERT INTO kora_health(id, checked_at) VALUES(1, \(at.milliseconds))
                ON CONFLICT(id) DO UPDATE SET checked_at = excluded.checked_at)
            SELECT version, oldest_reader FROM kora_schema_version
            """
        ).first?.decode((Int64, Int64).self)
        if let (version, reader) = schema, reader > PostgresSchema.migrations.count {
            throw PostgresSchema.TooNew(version: Int(version), oldestReader: Int(reader))
        }
    }
}

/// Why the PostgreSQL store failed, as a sentence fit for `/readyz` and logs: the server and the
/// cause, never the URL's password.
struct PostgresStoreError: Error, Sendable, CustomStringConvertible {
    var location: String
    var reason: String

    package var description: String { "PostgreSQL at \(location): \(reason)" }

    /// What went wrong, from postgres-nio's errors (whose own description is deliberately empty).
    static func describe(_ error: any Error) -> String {
        switch error {
        case let error as PSQLError:
            if let message = error.serverInfo?[.message] {
                return "the server says: \(message) (\(error.serverInfo?[.sqlState] ?? "?"))"
            }
            let cause = error.underlying.map { ": \($0)" } ?? ""
            return switch error.code {
            case .connectionError: "cannot connect\(cause)"
            case .serverClosedConnection: "the server closed the connection\(cause)"
            case .clientClosedConnection, .poolClosed: "the connection pool is closed"
            default: "\(error.code)\(cause)"
            }
        case is CancellationError:
            return "the operation was cancelled"
        default:
            return "\(error)"
        }
    }
}

extension PostgresStore: BudgetLedger {
    /// Any constant, the same in every replica: the advisory lock that makes taking a turn atomic.
    static let budgetLock: Int64 = 0x4B6F_7261_4275_6467  // "KoraBudg"

    /// Takes a turn in the budget every replica shares: the calls of the last window are rows, so
    /// two replicas never spend the same turn.
    func take(perWindow: Int?, window: Duration, at now: UnixTime) async throws -> BudgetTurn {
        try await inTransaction { connection in
            try await connection.query("SELECT pg_advisory_xact_lock(\(Self.budgetLock))", logger: self.logger)
            let hold = try await connection.query("SELECT held_until FROM kora_budget_hold WHERE id = 1", logger: self.logger)
                .collect().first?.decode(Int64.self)
            let held = hold.flatMap { now.milliseconds < $0 ? $0 : nil }
            guard let perWindow else { return BudgetTurn(nextTurn: held.map(UnixTime.init(milliseconds:)), remaining: held == nil ? -1 : 0) }
            let since = now.milliseconds - window.milliseconds
            try await connection.query("DELETE FROM kora_budget_calls WHERE sent_at <= \(since)", logger: self.logger)
            // The turn that frees first: the perWindow-th newest call's time plus the window; the
            // later of it and Kora's hold, or a caller told the hold's end would wait for nothing.
            let blocking = try await connection.query(
                "SELECT sent_at FROM kora_budget_calls ORDER BY sent_at DESC OFFSET \(perWindow - 1) LIMIT 1", logger: self.logger
            ).collect().first?.decode(Int64.self)
            let slot = blocking.map { $0 + window.milliseconds }
            if let next = [held, slot].compactMap({ $0 }).max() { return BudgetTurn(nextTurn: UnixTime(milliseconds: next), remaining: 0) }
            try await connection.query("INSERT INTO kora_budget_calls(sent_at) VALUES(\(now.milliseconds))", logger: self.logger)
            let count = try await connection.query("SELECT COUNT(*) FROM kora_budget_calls", logger: self.logger)
                .collect().first?.decode(Int64.self) ?? 0
            return BudgetTurn(nextTurn: nil, remaining: perWindow - Int(count))
        }
    }

    func hold(until: UnixTime) async throws {
        _ = try await rows(
            """
            INSERT INTO kora_budget_hold(id, held_until) VALUES(1, \(until.milliseconds))
            ON CONFLICT(id) DO UPDATE SET held_until = GREATEST(kora_budget_hold.held_until, excluded.held_until)
            """)
    }
}

extension BodyColumns {
    /// The plain body columns as PostgreSQL keeps them: NULL when the body is sealed (schema 9).
    fileprivate var plainNormalized: ByteBuffer? { sealed == nil ? ByteBuffer(bytes: normalized) : nil }
    fileprivate var plainOriginal: ByteBuffer? { sealed == nil ? ByteBuffer(bytes: original) : nil }
}
#endif
