import Foundation
import KoraSidecarCore
import Logging
import ServiceLifecycle

extension StorageConfiguration {
    /// Opens the configured store. `service` belongs first in the service group: it keeps the
    /// store running (PostgreSQL's connection pool) and closes it after everything else stopped.
    /// - Throws: ``StartupError`` naming the key when the store cannot be opened.
    package func open(logger: Logger) throws -> (store: any SidecarStore, service: any Service) {
        if let url = postgresURL {
            let store = try openPostgres(url, logger: logger.with("component", "store"))
            return (store, store)
        }
        let sqlite = try openSQLite()
        // Closing waits for queued writes: it runs on a thread of its own, not the cooperative pool.
        let close = CloseOnShutdown {
            await withCheckedContinuation { done in
                Thread {
                    sqlite.close()
                    done.resume()
                }.start()
            }
        }
        return (sqlite, close)
    }

    /// Runs `body` with the configured store open, then closes it (one-shot commands, which never
    /// create a store: a SQLite file that does not exist is an error naming its path).
    package func withStore<T: Sendable>(logger: Logger, _ body: @Sendable (any SidecarStore) async throws -> T) async throws -> T {
        guard let url = postgresURL else {
            guard FileManager.default.fileExists(atPath: sqlitePath) else {
                throw StartupError(
                    "The store \(sqlitePath) (storage.sqlitePath) does not exist: run the command where serve runs, "
                        + "or give --config with serve's configuration.")
            }
            let sqlite = try openSQLite()
            defer { sqlite.close() }
            return try await body(sqlite)
        }
        do {
            return try await openPostgres(url, logger: logger).whileRunning(body)
        } catch let error as PostgresStoreError {
            throw StartupError("The store (storage.postgresURL) cannot be reached: \(error).")
        }
    }

    private func openPostgres(_ url: Secret, logger: Logger) throws -> PostgresStore {
        do {
            return try PostgresStore(url: url, logger: logger)
        } catch {
            throw StartupError("The store (storage.postgresURL) cannot be used: \(error.problems.map(\.reason).joined(separator: "; ")).")
        }
    }

    private func openSQLite() throws -> SQLiteStore {
        do {
            return try SQLiteStore(path: sqlitePath)
        } catch let error as SQLiteError {
            throw StartupError("The store \(sqlitePath) (storage.sqlitePath) cannot be opened: \(error.message).")
        } catch {
            // Foundation's error for a folder it could not create is a long dump: say it plainly.
            throw StartupError(
                "The store \(sqlitePath) (storage.sqlitePath) cannot be opened: its folder cannot be created; "
                    + "check that the path exists and that this user may write there.")
        }
    }
}
