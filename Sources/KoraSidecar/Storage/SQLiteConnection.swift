import CSQLite
import KoraSidecarCore

/// A failure reported by SQLite, with its result code and message.
struct SQLiteError: Error, Sendable, CustomStringConvertible {
    /// SQLite's primary result code.
    package var code: Int32
    /// SQLite's message.
    package var message: String

    package var description: String { "SQLite error \(code): \(message)" }

    /// The store's file was deleted or replaced while the sidecar ran: it writes nothing more there.
    static let fileMoved = SQLiteError(
        code: SQLITE_IOERR, message: "the store's file (storage.sqlitePath) was deleted or replaced while the sidecar ran; restore it, or restart the sidecar to create a new one")
}

/// One SQLite connection, used from one thread at a time (its owner serialises access).
final class SQLiteConnection {
    private let handle: OpaquePointer
    private var statements: [String: OpaquePointer] = [:]

    /// Opens (and creates when absent) the database at `path`; with `readOnly`, opens an existing
    /// database for reading only.
    init(path: String, readOnly: Bool = false) throws(SQLiteError) {
        var db: OpaquePointer?
        let flags = (readOnly ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE) | SQLITE_OPEN_NOMUTEX
        let result = sqlite3_open_v2(path, &db, flags, nil)
        guard result == SQLITE_OK, let db else {
            let message = db.map { String(cString: sqlite3_errmsg($0)) } ?? "cannot open"
            if let db { sqlite3_close_v2(db) }
            throw SQLiteError(code: result, message: message)
        }
        handle = db
        sqlite3_extended_result_codes(db, 0)
        sqlite3_busy_timeout(db, 5000)
    }

    private var isOpen = true

    /// Finalizes the statements and closes the file; the last connection's close checkpoints the
    /// WAL into the database and removes it.
    func close() {
        guard isOpen else { return }
        isOpen = false
        for statement in statements.values { sqlite3_finalize(statement) }
        statements = [:]
        sqlite3_close_v2(handle)
    }

    deinit { close() }

    private func error(_ code: Int32) -> SQLiteError {
        SQLiteError(code: code, message: String(cString: sqlite3_errmsg(handle)))
    }

    /// Runs one or more statements that return no rows.
    func execute(_ sql: String) throws(SQLiteError) {
        let result = sqlite3_exec(handle, sql, nil, nil, nil)
        guard result == SQLITE_OK else { throw error(result) }
    }

    /// Runs `sql` with `bindings` and returns every row.
    @discardableResult
    func query(_ sql: String, _ bindings: [SQLiteValue] = []) throws(SQLiteError) -> [SQLiteRow] {
        let statement = try prepared(sql)
        defer {
            sqlite3_reset(statement)
            sqlite3_clear_bindings(statement)
        }
        for (index, value) in bindings.enumerated() {
            let position = Int32(index + 1)
            let result: Int32
            switch value {
            case .null: result = sqlite3_bind_null(statement, position)
            case .integer(let int): result = sqlite3_bind_int64(statement, position, int)
            // With their lengths: a C string would end at a NUL inside the text, and a 32-bit length
            // traps past 2 GiB where SQLite answers SQLITE_TOOBIG.
            case .text(var text):
                result = text.withUTF8 { utf8 in
                    utf8.withMemoryRebound(to: CChar.self) { chars in
                        // An empty buffer may have no address, which SQLite would take for NULL.
                        guard let start = chars.baseAddress else { return sqlite3_bind_text(statement, position, "", 0, transient) }
                        return sqlite3_bind_text64(statement, position, start, UInt64(chars.count), transient, UInt8(SQLITE_UTF8))
                    }
                }
            case .blob(let bytes):
                result = bytes.withUnsafeBytes { sqlite3_bind_blob64(statement, position, $0.baseAddress, UInt64($0.count), transient) }
            }
            guard result == SQLITE_OK else { throw error(result) }
        }
        var rows: [SQLiteRow] = []
        while true {
            let result = sqlite3_step(statement)
            if result == SQLITE_DONE { return rows }
            guard result == SQLITE_ROW else { throw error(result) }
            rows.append(SQLiteRow(statement: statement))
        }
    }

    /// Rows changed by the last statement.
    var changes: Int { Int(sqlite3_changes(handle)) }

    /// Whether a transaction is open (SQLite ends one on its own after some failures).
    var isInTransaction: Bool { sqlite3_get_autocommit(handle) == 0 }

    /// Whether the file this connection opened was deleted, renamed or replaced since: what is
    /// written then goes to a file that no name reaches, and is gone at the next start.
    var fileHasMoved: Bool {
        var moved: Int32 = 0
        return sqlite3_file_control(handle, "main", SQLITE_FCNTL_HAS_MOVED, &moved) == SQLITE_OK && moved != 0
    }

    /// The rowid of the last insert.
    var lastInsertRowID: Int64 { sqlite3_last_insert_rowid(handle) }

    private func prepared(_ sql: String) throws(SQLiteError) -> OpaquePointer {
        if let statement = statements[sql] { return statement }
        var statement: OpaquePointer?
        let result = sqlite3_prepare_v3(handle, sql, -1, UInt32(SQLITE_PREPARE_PERSISTENT), &statement, nil)
        guard result == SQLITE_OK, let statement else { throw error(result) }
        statements[sql] = statement
        return statement
    }
}

private let transient = unsafeBitCast(-1, to: sqlite3_destructor_type.self)

/// A value bound to or read from SQLite.
enum SQLiteValue: Sendable {
    case null
    case integer(Int64)
    case text(String)
    case blob([UInt8])

    static func optional(_ text: String?) -> SQLiteValue { text.map(SQLiteValue.text) ?? .null }
    static func int(_ value: Int) -> SQLiteValue { .integer(Int64(value)) }
}

/// One result row, copied out of the statement.
struct SQLiteRow: Sendable {
    private let values: [SQLiteValue]

    fileprivate init(statement: OpaquePointer) {
        values = (0..<sqlite3_column_count(statement)).map { column in
            switch sqlite3_column_type(statement, column) {
            case SQLITE_INTEGER: return .integer(sqlite3_column_int64(statement, column))
            case SQLITE_TEXT: return .text(String(cString: sqlite3_column_text(statement, column)))
            case SQLITE_BLOB:
                let count = Int(sqlite3_column_bytes(statement, column))
                guard count > 0, let pointer = sqlite3_column_blob(statement, column) else { return .blob([]) }
                return .blob(Array(UnsafeRawBufferPointer(start: pointer, count: count)))
            case SQLITE_FLOAT: return .integer(Int64(sqlite3_column_double(statement, column)))
            default: return .null
            }
        }
    }

    func int(_ column: Int) -> Int64 {
        if case .integer(let value) = values[column] { return value }
        return 0
    }

    func optionalInt(_ column: Int) -> Int64? {
        if case .integer(let value) = values[column] { return value }
        return nil
    }

    func string(_ column: Int) -> String {
        optionalString(column) ?? ""
    }

    func optionalString(_ column: Int) -> String? {
        switch values[column] {
        case .text(let text): text
        case .blob(let bytes): String(decoding: bytes, as: UTF8.self)
        default: nil
        }
    }

    func bytes(_ column: Int) -> [UInt8] {
        optionalBytes(column) ?? []
    }

    func optionalBytes(_ column: Int) -> [UInt8]? {
        switch values[column] {
        case .blob(let bytes): bytes
        case .text(let text): Array(text.utf8)
        default: nil
        }
    }
}
