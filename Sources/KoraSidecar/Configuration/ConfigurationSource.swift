import Foundation

/// Where `serve` and `check-config` take their configuration from (SPEC §2): `--config FILE`, else
/// `$KORA_SIDECAR_CONFIG`, else `./config.json` when it exists, else the environment alone.
public enum ConfigurationSource: Sendable, Equatable {
    case file(String)
    case environment

    /// Picks the source from the flag and the environment.
    public static func resolve(flag: String?, environment: [String: String]) -> ConfigurationSource {
        if let flag { return .file(flag) }
        if let path = environment["KORA_SIDECAR_CONFIG"], !path.isEmpty { return .file(path) }
        if FileManager.default.fileExists(atPath: "config.json") { return .file("config.json") }
        return .environment
    }

    /// Loads and validates the configuration from this source (see `resolvingSecrets` on
    /// ``SidecarConfiguration/load(document:source:environment:resolvingSecrets:)``).
    public func load(environment: [String: String], resolvingSecrets: Bool = true) throws -> SidecarConfiguration {
        switch self {
        case .file(let path):
            guard FileManager.default.fileExists(atPath: path) else {
                throw ConfigurationError(source: path, problems: [.init(path: "$", reason: "the file does not exist")])
            }
            return try SidecarConfiguration.load(file: path, environment: environment, resolvingSecrets: resolvingSecrets)
        case .environment:
            return try SidecarConfiguration.load(
                document: EnvironmentConfiguration.document(environment), source: "the environment (no configuration file)",
                environment: environment, resolvingSecrets: resolvingSecrets)
        }
    }
}
