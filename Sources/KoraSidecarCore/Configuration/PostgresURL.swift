#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// A PostgreSQL address as operators write it, libpq style:
/// `postgres://user:password@host:5432/database?sslmode=require`.
///
/// `sslmode` follows libpq: `disable`; `prefer` (the default: TLS when the server offers it);
/// `require` (TLS, certificate not checked); `verify-full` (TLS, certificate and host checked).
package struct PostgresURL: Sendable {
    package enum TLSMode: String, Sendable {
        case disable
        case prefer
        case require
        case verifyFull = "verify-full"
    }

    /// Why a URL cannot be used; never quotes the URL, which holds the password.
    package struct Problem: Error, Sendable {
        package var reason: String
    }

    package var host: String
    package var port: Int
    package var username: String
    package var password: String?
    package var database: String
    package var tlsMode: TLSMode

    package init(_ secret: Secret) throws(Problem) {
        guard let url = URLComponents(string: secret.value) else {
            throw Problem(reason: "must be a URL such as postgres://user:password@host:5432/database")
        }
        guard let scheme = url.scheme?.lowercased(), scheme == "postgres" || scheme == "postgresql" else {
            throw Problem(reason: "must start with postgres:// or postgresql://")
        }
        guard let host = url.host, !host.isEmpty else { throw Problem(reason: "must name a host") }
        guard let user = url.user, !user.isEmpty else { throw Problem(reason: "must name a user (postgres://user@host/database)") }
        let database = String(url.path.drop(while: { $0 == "/" }))
        guard !database.isEmpty, !database.contains("/") else {
            throw Problem(reason: "must name one database in its path (postgres://user@host/database)")
        }
        var tlsMode = TLSMode.prefer
        for item in url.queryItems ?? [] {
            guard item.name == "sslmode" else { throw Problem(reason: "has an unknown parameter \(item.name); only sslmode is read") }
            guard let mode = item.value.flatMap(TLSMode.init(rawValue:)) else {
                throw Problem(reason: "sslmode must be disable, prefer, require or verify-full")
            }
            tlsMode = mode
        }
        self.host = host
        self.port = url.port ?? 5432
        // URLComponents has already decoded them once: `%2541` in a password means `%41`, not `A`.
        self.username = user
        self.password = url.password
        self.database = database
        self.tlsMode = tlsMode
    }

    /// Where the database is, for messages: no user, no password.
    package var location: String { "\(host):\(port)/\(database)" }
}
