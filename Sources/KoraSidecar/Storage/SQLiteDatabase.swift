#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Dispatch
import KoraSidecarCore
import NIOConcurrencyHelpers
import NIOPosix

/// The store's SQLite file, used through three connections, each on a dedicated thread so that no
/// SQLite call ever blocks the event loops or the cooperative pool: the writer runs every write,
/// and a read-only reader runs pure reads, which WAL mode lets proceed while the writer commits
/// (a read never waits behind the fsync of queued writes).
final class SQLiteDatabase: Sendable {
    private let writer: SQLiteThread
    private let reader: SQLiteThread
    /// A second reader for reads that scan whole tables (the metrics' counts): on the reader, they
    /// made every read behind them wait, a webhook's among them, for as long as the scan took.
    private let scanner: SQLiteThread

    /// The database file.
    let path: String

    /// Opens the database at `path` (creating its folder and file), in WAL mode with `synchronous=FULL`
    /// so that a commit is on disk before it returns, and applies `migrations` in order; it records
    /// `oldestReader`, the fewest migrations a binary must know to use the database after them.
    init(path: String, migrations: [String], oldestReader: Int) throws {
        self.path = path
        let directory = folder(of: path)
        if !directory.isEmpty, !FileManager.default.fileExists(atPath: directory) {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        }
        let connection = try SQLiteConnection(path: path)
        let mode = try connection.query("PRAGMA journal_mode=WAL").first?.string(0)
        guard mode == "wal" else { throw SQLiteError(code: 1, message: "cannot switch to WAL mode") }
        // secure_delete: a deleted body (erased, expired, re-sealed) is overwritten, not left in free pages.
        try connection.execute("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; PRAGMA secure_delete=ON;")
        try Self.migrate(connection, migrations, oldestReader: oldestReader)
        // Opened once the writer has created and migrated the file.
        let readConnection = try SQLiteConnection(path: path, readOnly: true)
        let scanConnection = try SQLiteConnection(path: path, readOnly: true)
        writer = SQLiteThread(connection, name: "kora-sqlite", writes: true)
        reader = SQLiteThread(readConnection, name: "kora-sqlite-rd", writes: false)
        scanner = SQLiteThread(scanConnection, name: "kora-sqlite-scan", writes: false)
    }

    /// Runs `body` in a transaction on the writer's thread and returns once it is committed.
    ///
    /// A write that is not `durable` is one a crash may undo without harm (a lease: every start
    /// releases them all): when a transaction holds only such writes, its commit skips the fsync.
    /// The next durable commit syncs the log, and with it every write before it, in order.
    ///
    /// With a `timeout`, the caller is answered ``StoreDidNotAnswer`` when the commit has not come by
    /// then (a stalled disk); the write itself still runs when the disk lets it.
    @discardableResult
    func write<T: Sendable>(
        durable: Bool = true, timeout: Duration? = nil, _ body: @escaping @Sendable (SQLiteConnection) throws -> T
    ) async throws -> T {
        try await writer.run(durable: durable, timeout: timeout, body)
    }

    /// Runs `body` (which must not write) on the reader's thread, in a read transaction that sees
    /// every write committed before the call, but none still queued or in progress on the writer.
    func read<T: Sendable>(_ body: @escaping @Sendable (SQLiteConnection) throws -> T) async throws -> T {
        try await reader.run(body)
    }

    /// Runs `body`, a read that may scan a whole table, on a reader of its own (see ``read(_:)``).
    func scan<T: Sendable>(_ body: @escaping @Sendable (SQLiteConnection) throws -> T) async throws -> T {
        try await scanner.run(body)
    }

    /// How many writes wait for the writer's thread (for tests that need several in one batch).
    var queuedWrites: Int { writer.queued }

    /// Finishes the queued operations and closes the connections, the writer last: the last
    /// connection's close checkpoints the WAL and removes it.
    func close() {
        scanner.close()
        reader.close()
        writer.close()
    }

    private static func migrate(_ connection: SQLiteConnection, _ migrations: [String], oldestReader: Int) throws {
        func version() throws -> Int {
            let version = Int(try connection.query("PRAGMA user_version").first?.int(0) ?? 0)
            if version > migrations.count {
                // A newer kora-sidecar migrated it: usable here only if it says so (its changes only added).
                let reader = try? connection.query("SELECT oldest FROM schema_reader").first?.int(0)
                guard let reader, reader <= migrations.count else {
                    // SQLITE_CANTOPEN: a newer kora-sidecar's store may not mean what this build would read.
                    throw SQLiteError(
                        code: 14,
                        message: "schema version \(version) was written by a newer kora-sidecar (this one knows \(migrations.count)"
                            + (reader.map { "; it needs \($0)" } ?? "") + ")")
                }
                return migrations.count
            }
            return version
        }
        guard try version() < migrations.count else { return }
        try connection.execute("BEGIN IMMEDIATE")
        do {
            // Read again under the write lock: another process opening the same store (`serve` and a
            // `deliveries` command) may have migrated it since, and a second run of a version fails.
            let current = try version()
            guard current < migrations.count else {
                // Migrated meanwhile, perhaps by a newer version: its user_version must stay.
                try connection.execute("ROLLBACK")
                return
            }
            for migration in migrations[current...] { try connection.execute(migration) }
            try connection.execute("PRAGMA user_version=\(migrations.count)")
            try connection.execute("CREATE TABLE IF NOT EXISTS schema_reader(oldest INTEGER NOT NULL)")
            let recorded = try connection.query("SELECT oldest FROM schema_reader").first?.int(0) ?? 0
            try connection.execute("DELETE FROM schema_reader")
            try connection.execute("INSERT INTO schema_reader(oldest) VALUES(\(max(Int64(oldestReader), recorded)))")
            try connection.execute("COMMIT")
        } catch {
            try? connection.execute("ROLLBACK")
            throw error
        }
    }
}

/// One SQLite connection on a dedicated thread, its only user, which runs the operations that
/// arrived while it was busy together in one transaction (for writes, group commit: one fsync for
/// many webhooks under load).
private final class SQLiteThread: @unchecked Sendable {
    private struct Operation {
        /// Runs inside the open transaction; returns what resumes the caller once committed.
        let run: (SQLiteConnection) throws -> (() -> Void)
        let fail: (any Error) -> Void
        /// Whether its commit must be on disk before the caller resumes.
        let durable: Bool
    }

    /// Largest number of operations run in one transaction.
    private static let maximumBatch = 512

    /// Whether the operations write: they then run in `BEGIN IMMEDIATE`, each in a savepoint so that
    /// one failing undoes only itself; reads share a plain read transaction, one snapshot.
    private let writes: Bool
    /// Guards `pending` and `closed`; its value is 1 while the thread has something to do.
    private let condition = ConditionLock(value: 0)
    private var pending: [Operation] = []
    private var closed = false
    /// 1 while the loop runs: `close()` waits for 0.
    private let running = ConditionLock(value: 1)
    /// The connection's `synchronous` setting now: FULL, or NORMAL while it commits only writes
    /// that need not be durable. Only the thread's loop reads or changes it.
    private var syncsEachCommit = true

    init(_ connection: SQLiteConnection, name: String, writes: Bool) {
        self.writes = writes
        let owned = OwnedConnection(connection: connection)
        // A serial queue of its own always gets a thread of its own (it overcommits): the loop blocks it for
        // the connection's whole life, never the cooperative pool's few threads.
        DispatchQueue(label: name).async { [self] in self.loop(owned.connection) }
    }

    /// Hands the connection to the thread, its only user from then on.
    private struct OwnedConnection: @unchecked Sendable {
        let connection: SQLiteConnection
    }

    /// Runs `body` in a transaction on the thread and returns once it is committed, or throws
    /// ``StoreDidNotAnswer`` once `timeout` passed without.
    func run<T: Sendable>(
        durable: Bool = true, timeout: Duration? = nil, _ body: @escaping @Sendable (SQLiteConnection) throws -> T
    ) async throws -> T {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, any Error>) in
            let answer = Self.answer(continuation, within: timeout)
            let operation = Operation(
                run: { connection in
                    let value = try body(connection)
                    return { answer(.success(value)) }
                },
                fail: { answer(.failure($0)) },
                durable: durable
            )
            condition.lock()
            if closed {
                condition.unlock()
                answer(.failure(SQLiteError(code: 21, message: "the store is closed")))
                return
            }
            pending.append(operation)
            condition.unlock(withValue: 1)
        }
    }

    /// Resumes `continuation` with the operation's result; with a `timeout`, with the first of that
    /// and ``StoreDidNotAnswer`` (an event loop's timer, not a task per call).
    private static func answer<T: Sendable>(
        _ continuation: CheckedContinuation<T, any Error>, within timeout: Duration?
    ) -> @Sendable (Result<T, any Error>) -> Void {
        guard let timeout else { return { continuation.resume(with: $0) } }
        let caller = NIOLockedValueBox<CheckedContinuation<T, any Error>?>(continuation)
        let timer = MultiThreadedEventLoopGroup.singleton.next().scheduleTask(in: .milliseconds(timeout.milliseconds)) {
            caller.withLockedValue { $0.take() }?.resume(throwing: StoreDidNotAnswer(wait: timeout))
        }
        return { result in
            timer.cancel()
            caller.withLockedValue { $0.take() }?.resume(with: result)
        }
    }

    /// How many operations wait for the thread.
    var queued: Int {
        condition.lock()
        defer { condition.unlock() }
        return pending.count
    }

    /// Finishes the queued operations, then closes the connection and its thread.
    func close() {
        condition.lock()
        closed = true
        condition.unlock(withValue: 1)
        running.lock(whenValue: 0)
        running.unlock()
    }

    private func loop(_ connection: SQLiteConnection) {
        while let batch = nextBatch() {
            commit(batch, connection)
        }
        // Closed before `close()` returns, so the file is whole and unlocked when the process exits.
        connection.close()
        running.lock()
        running.unlock(withValue: 0)
    }

    private func nextBatch() -> [Operation]? {
        condition.lock(whenValue: 1)
        defer { condition.unlock(withValue: pending.isEmpty && !closed ? 0 : 1) }
        if pending.isEmpty { return nil }
        let batch = Array(pending.prefix(Self.maximumBatch))
        pending.removeFirst(batch.count)
        return batch
    }

    private func commit(_ batch: [Operation], _ connection: SQLiteConnection) {
        var committed: [(resume: () -> Void, fail: (any Error) -> Void)] = []
        // Through `query`, whose statements are prepared once per connection, not parsed for every operation.
        do {
            if writes {
                // One stat(2) a batch: an event acknowledged into a deleted file would be lost.
                guard !connection.fileHasMoved else { throw SQLiteError.fileMoved }
                try synchronous(each: batch.contains { $0.durable }, connection)
            }
            try connection.query(writes ? "BEGIN IMMEDIATE" : "BEGIN")
        } catch {
            batch.forEach { $0.fail(error) }
            return
        }
        for (index, operation) in batch.enumerated() {
            do {
                if writes { try connection.query("SAVEPOINT operation") }
                let resume = try operation.run(connection)
                if writes { try connection.query("RELEASE operation") }
                committed.append((resume, operation.fail))
            } catch {
                if writes { try? connection.execute("ROLLBACK TO operation; RELEASE operation") }
                operation.fail(error)
                // Some failures (a full disk, an I/O error) make SQLite roll back the whole transaction:
                // the operations before were undone, and those after would each commit on their own
                // while being told they failed. Every one of them fails, as the file says.
                if writes, !connection.isInTransaction {
                    committed.forEach { $0.fail(error) }
                    batch[(index + 1)...].forEach { $0.fail(error) }
                    return
                }
            }
        }
        do {
            try connection.query("COMMIT")
            committed.forEach { $0.resume() }
        } catch {
            try? connection.execute("ROLLBACK")
            committed.forEach { $0.fail(error) }
        }
    }

    /// Sets whether commits wait for the fsync (WAL mode: FULL syncs the log at each commit,
    /// NORMAL leaves it to the next commit that does, or to the checkpoint).
    private func synchronous(each: Bool, _ connection: SQLiteConnection) throws {
        guard each != syncsEachCommit else { return }
        try connection.query(each ? "PRAGMA synchronous=FULL" : "PRAGMA synchronous=NORMAL")
        syncsEachCommit = each
    }
}

/// The store did not answer within `wait` (a stalled disk).
struct StoreDidNotAnswer: Error, CustomStringConvertible {
    let wait: Duration
    var description: String { "it did not answer within \(wait.components.seconds) s" }
}
