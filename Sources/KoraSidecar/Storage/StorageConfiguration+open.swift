#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import Dispatch
import KoraSidecarCore
import Logging
import ServiceLifecycle

extension StorageConfiguration {
    /// Opens the configured store. `service` belongs first in the service group: it keeps the
    /// store running (PostgreSQL's connection pool) and closes it after everything else stopped.
    /// - Throws: ``StartupError`` naming the key when the store cannot be opened.
    package func open(logger: Logger) throws -> (store: any SidecarStore, service: any Service) {
        if let url = postgresURL {
            #if PostgreSQL
            if FileManager.default.fileExists(atPath: sqlitePath) {
                // A switch from SQLite: what it holds (pending deliveries, recent ids, origins) stays there.
                logger.warning(
                    "A SQLite store is still at storage.sqlitePath, but the store is PostgreSQL: its pending deliveries are not sent",
                    metadata: ["path": "\(sqlitePath)"])
            }
            let store = try openPostgres(url, logger: logger.with("component", "store"), protection: try protection())
            return (store, store)
            #else
            _ = url
            throw StartupError.withoutPostgreSQL
            #endif
        }
        let sqlite = try openSQLiteCreatingKey(logger: logger)
        let lock: StoreLock
        do {
            lock = try StoreLock(storePath: sqlitePath)
        } catch {
            sqlite.close()
            throw error
        }
        // Closing waits for queued writes, so it blocks a thread of its own (a serial queue's), not the
        // cooperative pool's; and it runs even when the service group was cancelled (a cancellation-aware
        // call would skip it).
        let close = CloseOnShutdown {
            await withCheckedContinuation { closed in
                DispatchQueue(label: "kora-sqlite-close").async {
                    sqlite.close()
                    lock.release()
                    closed.resume()
                }
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
            let sqlite = try openSQLite(protection: try protection())
            defer { sqlite.close() }
            return try await body(sqlite)
        }
        #if PostgreSQL
        do {
            return try await openPostgres(url, logger: logger, protection: try protection()).whileRunning(body)
        } catch let error as PostgresStoreError {
            throw StartupError("The store (storage.postgresURL) cannot be reached: \(error).")
        }
        #else
        _ = url
        throw StartupError.withoutPostgreSQL
        #endif
    }

    /// How the store seals and keeps bodies: the configured keys, then the key file's (so that rows
    /// sealed before keys were configured still open), else `newKey` (serve's first start with SQLite).
    func protection(newKey: SealingKey? = nil) throws -> DataProtection {
        var keys: [SealingKey] = encryptionKeys.compactMap { SealingKey(id: $0.id, base64: $0.key.value) }
        if postgresURL == nil, let fileKey = try KeyFile.read(keyFilePath), !keys.contains(where: { $0.id == fileKey.id }) {
            keys.append(fileKey)
        }
        if keys.isEmpty, let newKey { keys = [newKey] }
        return DataProtection(
            sealer: keys.isEmpty ? nil : PayloadSealer(keys: keys), payloadRetention: payloadRetention, deadRetention: deadRetention)
    }

    /// Opens the SQLite store for serve; with no key anywhere, seals with a new one written to the
    /// key file once the store opened (so a store that cannot be opened leaves no key file behind).
    private func openSQLiteCreatingKey(logger: Logger) throws -> SQLiteStore {
        let newKey = SealingKey.generate(id: "local-" + RandomID.make().prefix(8))
        let protection = try protection(newKey: newKey)
        let sqlite = try openSQLite(protection: protection)
        guard protection.sealer?.sealingKeyID == newKey.id else { return sqlite }
        do {
            // Bodies already sealed mean the key file was lost: a new key would not open them.
            if let lost = try SQLiteConnection(path: sqlitePath, readOnly: true).query(
                "SELECT key_id FROM events WHERE key_id IS NOT NULL UNION SELECT key_id FROM quarantine WHERE key_id IS NOT NULL LIMIT 1"
            ).first?.string(0) {
                throw StartupError(
                    "The store \(sqlitePath) holds bodies sealed with key \"\(lost)\", but the key file \(keyFilePath) is missing and "
                        + "storage.encryption.keys does not list it: restore the key file from the backup taken with the store.")
            }
            try KeyFile.create(keyFilePath, key: newKey)
        } catch {
            sqlite.close()
            throw error
        }
        logger.notice(
            "Created an encryption key for stored bodies; keep it with the store, or set storage.encryption.keys",
            metadata: ["file": "\(keyFilePath)"])
        return sqlite
    }

    #if PostgreSQL
    private func openPostgres(_ url: Secret, logger: Logger, protection: DataProtection) throws -> PostgresStore {
        do {
            return try PostgresStore(url: url, logger: logger, protection: protection)
        } catch {
            throw StartupError("The store (storage.postgresURL) cannot be used: \(error.problems.map(\.reason).joined(separator: "; ")).")
        }
    }
    #endif

    private func openSQLite(protection: DataProtection) throws -> SQLiteStore {
        if let problem = FileAccess.problem(writing: sqlitePath) {
            throw StartupError("The store \(sqlitePath) (storage.sqlitePath) cannot be opened: \(problem).")
        }
        do {
            return try SQLiteStore(path: sqlitePath, protection: protection)
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

/// Why this process cannot use a file it must write (the store, whose SQLite error would only say
/// "unable to open database file" or, once running, "attempt to write a readonly database").
enum FileAccess {
    /// What stops this user writing `path` (or creating it in its folder), in words; nil when nothing does.
    static func problem(writing path: String) -> String? {
        var status = stat()
        if stat(path, &status) == 0 {
            if (status.st_mode & S_IFMT) == S_IFDIR { return "it is a folder; name a file in it" }
            if access(path, R_OK | W_OK) != 0 { return "this user (uid \(getuid())) may not write it: \(owner(of: path))" }
        }
        let directory = folder(of: path)
        let parent = directory.isEmpty ? "." : directory
        // A folder still to be created is created (or refused) by the store itself.
        if stat(parent, &status) == 0, access(parent, W_OK | X_OK) != 0 {
            return "this user (uid \(getuid())) may not create files in \(parent): \(owner(of: parent))"
        }
        return nil
    }

    /// Who owns `path` and its mode, for a sentence saying what to change.
    static func owner(of path: String) -> String {
        var status = stat()
        guard stat(path, &status) == 0 else { return "check its permissions" }
        return "it belongs to uid \(status.st_uid) with mode \(String(status.st_mode & 0o777, radix: 8)); chown it to this user, or run as its owner"
    }
}

/// The key file of a SQLite store without configured keys: `{"id": …, "key": base64}`, mode 0600.
enum KeyFile {
    /// The key in the file at `path`; nil when there is no file.
    /// - Throws: ``StartupError`` naming the file when it cannot be read or holds no key.
    static func read(_ path: String) throws -> SealingKey? {
        guard FileManager.default.fileExists(atPath: path) else { return nil }
        if access(path, R_OK) != 0 {
            throw StartupError("The encryption key file \(path) cannot be read by this user (uid \(getuid())): \(FileAccess.owner(of: path)).")
        }
        guard let data = FileManager.default.contents(atPath: path), let json = try? JSONParser.parse(Array(data)),
            let id = json["id"]?.text, let base64 = json["key"]?.text, let key = SealingKey(id: id, base64: base64)
        else {
            throw StartupError("The encryption key file \(path) cannot be read or holds no key: restore it from a backup, or move it away together with the store.")
        }
        return key
    }

    /// Creates the file at `path` holding `key`, readable by this user alone. It is written whole
    /// under another name first and then linked in, so that a full disk or a kill mid-write leaves
    /// no empty key file behind (which every later start would refuse, with nothing to restore).
    static func create(_ path: String, key: SealingKey) throws {
        let text = JSONWriter.encode(["id": .string(key.id), "key": .string(key.base64)]) + [UInt8(ascii: "\n")]
        let partial = path + ".partial-\(getpid())"
        let descriptor = open(partial, O_WRONLY | O_CREAT | O_EXCL, 0o600)
        guard descriptor >= 0 else {
            throw StartupError("The encryption key file \(path) cannot be created: check that this user may write in its folder, or set storage.encryption.keys.")
        }
        defer { unlink(partial) }
        let written = text.withUnsafeBytes({ write(descriptor, $0.baseAddress, $0.count) }) == text.count && fsync(descriptor) == 0
        close(descriptor)
        guard written else {
            throw StartupError("The encryption key file \(path) cannot be written: check the disk, or set storage.encryption.keys.")
        }
        // Exclusive, as the create was: a key file another start made meanwhile is kept.
        guard link(partial, path) == 0 else {
            throw StartupError("The encryption key file \(path) cannot be created: \(String(cString: strerror(errno))).")
        }
        // The file's name is on disk too before any row is sealed with the key.
        let folder = folder(of: path)
        let directory = open(folder.isEmpty ? "." : folder, O_RDONLY)
        if directory >= 0 {
            _ = fsync(directory)
            close(directory)
        }
    }
}
