import Foundation

/// Owns one SQLite connection on a dedicated thread, so that no SQLite call ever blocks the event
/// loops or the cooperative pool, and commits together every operation that arrives while the
/// previous commit is in progress (group commit: one fsync for many webhooks under load).
final class SQLiteDatabase: @unchecked Sendable {
    private struct Operation {
        /// Runs inside the open transaction; returns what resumes the caller once committed.
        let run: (SQLiteConnection) throws -> (() -> Void)
        let fail: (any Error) -> Void
    }

    /// Largest number of operations committed in one transaction.
    private static let maximumBatch = 512

    private let condition = NSCondition()
    private var pending: [Operation] = []
    private var closed = false
    private let stopped = NSCondition()
    private var running = true

    /// The database file.
    let path: String

    /// Opens the database at `path` (creating its folder and file), in WAL mode with `synchronous=FULL`
    /// so that a commit is on disk before it returns, and applies `migrations` in order.
    init(path: String, migrations: [String]) throws {
        self.path = path
        let directory = (path as NSString).deletingLastPathComponent
        if !directory.isEmpty, !FileManager.default.fileExists(atPath: directory) {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        }
        let connection = try SQLiteConnection(path: path)
        let mode = try connection.query("PRAGMA journal_mode=WAL").first?.string(0)
        guard mode == "wal" else { throw SQLiteError(code: 1, message: "cannot switch to WAL mode") }
        try connection.execute("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")
        try Self.migrate(connection, migrations)
        let owned = OwnedConnection(connection: connection)
        let thread = Thread { [self] in self.loop(owned.connection) }
        thread.name = "kora-sidecar-sqlite"
        thread.start()
    }

    private static func migrate(_ connection: SQLiteConnection, _ migrations: [String]) throws {
        let version = Int(try connection.query("PRAGMA user_version").first?.int(0) ?? 0)
        if version > migrations.count {
            // SQLITE_CANTOPEN: a newer kora-sidecar's store may not mean what this build would read.
            throw SQLiteError(code: 14, message: "schema version \(version) was written by a newer kora-sidecar (this one knows \(migrations.count))")
        }
        guard version < migrations.count else { return }
        try connection.execute("BEGIN IMMEDIATE")
        do {
            for migration in migrations[version...] { try connection.execute(migration) }
            try connection.execute("PRAGMA user_version=\(migrations.count)")
            try connection.execute("COMMIT")
        } catch {
            try? connection.execute("ROLLBACK")
            throw error
        }
    }

    /// Hands the connection to the database thread, its only user from then on.
    private struct OwnedConnection: @unchecked Sendable {
        let connection: SQLiteConnection
    }

    /// Runs `body` in a transaction on the database thread and returns once it is committed.
    @discardableResult
    func write<T: Sendable>(_ body: @escaping @Sendable (SQLiteConnection) throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, any Error>) in
            let operation = Operation(
                run: { connection in
                    let value = try body(connection)
                    return { continuation.resume(returning: value) }
                },
                fail: { continuation.resume(throwing: $0) }
            )
            condition.lock()
            if closed {
                condition.unlock()
                continuation.resume(throwing: SQLiteError(code: 21, message: "the store is closed"))
                return
            }
            pending.append(operation)
            condition.signal()
            condition.unlock()
        }
    }

    /// Finishes the queued operations, then closes the connection and its thread.
    func close() {
        condition.lock()
        closed = true
        condition.signal()
        condition.unlock()
        stopped.lock()
        while running { stopped.wait() }
        stopped.unlock()
    }

    private func loop(_ connection: SQLiteConnection) {
        while let batch = nextBatch() {
            commit(batch, connection)
        }
        // Closed before `close()` returns, so the file is whole and unlocked when the process exits.
        connection.close()
        stopped.lock()
        running = false
        stopped.broadcast()
        stopped.unlock()
    }

    private func nextBatch() -> [Operation]? {
        condition.lock()
        defer { condition.unlock() }
        while pending.isEmpty, !closed { condition.wait() }
        if pending.isEmpty { return nil }
        let batch = Array(pending.prefix(Self.maximumBatch))
        pending.removeFirst(batch.count)
        return batch
    }

    private func commit(_ batch: [Operation], _ connection: SQLiteConnection) {
        var committed: [(resume: () -> Void, fail: (any Error) -> Void)] = []
        do {
            try connection.execute("BEGIN IMMEDIATE")
        } catch {
            batch.forEach { $0.fail(error) }
            return
        }
        for operation in batch {
            do {
                try connection.execute("SAVEPOINT operation")
                let resume = try operation.run(connection)
                try connection.execute("RELEASE operation")
                committed.append((resume, operation.fail))
            } catch {
                try? connection.execute("ROLLBACK TO operation; RELEASE operation")
                operation.fail(error)
            }
        }
        do {
            try connection.execute("COMMIT")
            committed.forEach { $0.resume() }
        } catch {
            try? connection.execute("ROLLBACK")
            committed.forEach { $0.fail(error) }
        }
    }
}
