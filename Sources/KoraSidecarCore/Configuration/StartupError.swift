/// A start-up failure the operator can fix, as one sentence naming the file, key or address.
package struct StartupError: Error, Sendable, Equatable, CustomStringConvertible {
    package var description: String

    package init(_ description: String) { self.description = description }
}

extension StartupError {
    /// Why a build without the `PostgreSQL` package trait refuses `storage.postgresURL`.
    package static let postgreSQLLeftOut = "this kora-sidecar was built without PostgreSQL (the SQLite-only build): keep state in SQLite, or run the standard build"

    /// A store in PostgreSQL asked of a build without the `PostgreSQL` package trait.
    package static let withoutPostgreSQL = StartupError("storage.postgresURL: \(postgreSQLLeftOut).")
}
