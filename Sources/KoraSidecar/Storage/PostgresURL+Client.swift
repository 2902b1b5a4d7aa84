#if PostgreSQL
import KoraSidecarCore
import NIOSSL
import PostgresNIO

extension PostgresURL {
    private static let connectTimeout = Duration.seconds(5)

    /// The client configuration for this address.
    var clientConfiguration: PostgresClient.Configuration {
        var configuration = PostgresClient.Configuration(
            host: host, port: port, username: username, password: password, database: database, tls: tls)
        configuration.options.connectTimeout = Self.connectTimeout
        configuration.options.maximumConnections = 16
        return configuration
    }

    /// The configuration of a connection of its own, outside the pool: the schema's migration
    /// uses one, so that a server refusing connections says why instead of leaving it waiting in
    /// the pool's queue.
    func connectionConfiguration() throws -> PostgresConnection.Configuration {
        var tls = PostgresConnection.Configuration.TLS.disable
        if let configuration = tlsConfiguration {
            let context = try NIOSSLContext(configuration: configuration)
            tls = tlsMode == .prefer ? .prefer(context) : .require(context)
        }
        var configuration = PostgresConnection.Configuration(
            host: host, port: port, username: username, password: password, database: database, tls: tls)
        configuration.options.connectTimeout = TimeAmount(Self.connectTimeout)
        return configuration
    }

    private var tls: PostgresClient.Configuration.TLS {
        guard let configuration = tlsConfiguration else { return .disable }
        return tlsMode == .prefer ? .prefer(configuration) : .require(configuration)
    }

    /// TLS as `sslmode` asks: the server's certificate verified only with `verify-full`.
    private var tlsConfiguration: TLSConfiguration? {
        switch tlsMode {
        case .disable: return nil
        case .prefer, .require:
            var unverified = TLSConfiguration.makeClientConfiguration()
            unverified.certificateVerification = .none
            return unverified
        case .verifyFull: return .makeClientConfiguration()
        }
    }
}
#endif
