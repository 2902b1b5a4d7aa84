#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Where every command takes its configuration from: `--config FILE`, else `$KORA_SIDECAR_CONFIG`,
/// else `./config.json` when it exists, else `/etc/kora-sidecar/config.json` when it exists, else
/// the environment alone. So `kora-sidecar deliveries list`, run with no flags beside `serve` (in
/// the container, `docker exec` / `kubectl exec`), finds the same configuration and store.
package enum ConfigurationSource: Sendable, Equatable {
    case file(String)
    case environment

    /// What start-up says of `environment` beside the configuration from this source.
    package func warnings(environment: [String: String]) -> [String] {
        EnvironmentConfiguration.warnings(environment, source: self)
    }

    /// Where the configuration came from, as a log line says it.
    package var description: String {
        switch self {
        case .file(let path): path
        case .environment: "the environment (no configuration file)"
        }
    }

    /// Where the container image and packages put the configuration.
    static let systemPath = "/etc/kora-sidecar/config.json"

    /// Picks the source from the flag and the environment.
    package static func resolve(flag: String?, environment: [String: String], systemPath: String = systemPath) -> ConfigurationSource {
        if let flag { return .file(flag) }
        if let path = environment["KORA_SIDECAR_CONFIG"], !path.isEmpty { return .file(path) }
        for path in ["config.json", systemPath] where FileManager.default.fileExists(atPath: path) { return .file(path) }
        return .environment
    }

    /// Loads and validates the configuration from this source (see `resolvingSecrets` on
    /// ``SidecarConfiguration/load(document:source:environment:resolvingSecrets:)``).
    package func load(environment: [String: String], resolvingSecrets: Bool = true) throws -> SidecarConfiguration {
        switch self {
        case .file(let path):
            guard FileManager.default.fileExists(atPath: path) else {
                throw ConfigurationError(source: path, problems: [.init(path: "$", reason: "the file does not exist")])
            }
            return try SidecarConfiguration.load(file: path, environment: environment, resolvingSecrets: resolvingSecrets)
        case .environment:
            do {
                return try SidecarConfiguration.load(
                    document: EnvironmentConfiguration.document(environment), source: "the environment (no configuration file)",
                    environment: environment, resolvingSecrets: resolvingSecrets)
            } catch let error as ConfigurationError {
                throw EnvironmentConfiguration.naming(variablesIn: error)
            }
        }
    }
}
