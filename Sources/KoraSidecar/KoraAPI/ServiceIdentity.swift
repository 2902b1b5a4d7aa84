import KoraSidecarCore

/// Which internal service is calling the API proxy (SPEC §5.2), and what it may call.
package struct ServiceIdentity: Sendable {
    /// One service as the proxy knows it.
    struct Caller: Sendable {
        /// The service's name (recorded as the origin of the verifications it creates).
        package let name: String
        /// Its `allow` patterns; nil allows everything.
        package let allow: [AllowPattern]?

        /// Whether the service may call `method` on `path` (relative to the Kora base).
        package func may(_ method: String, _ path: String) -> Bool {
            guard let allow else { return true }
            return allow.contains { $0.matches(method: method, path: path) }
        }
    }

    private let tokens: [(token: [UInt8], caller: Caller)]
    private let anonymous: Caller?

    /// Builds the table from `services`; the first service without a token is the anonymous caller
    /// (configuration validation allows at most one).
    package init(services: [ServiceConfiguration]) {
        var tokens: [(token: [UInt8], caller: Caller)] = []
        var anonymous: Caller?
        for service in services {
            let caller = Caller(name: service.name, allow: service.allow.map { $0.compactMap(AllowPattern.init) })
            if let token = service.token {
                tokens.append((token.bytes, caller))
            } else if anonymous == nil {
                anonymous = caller
            }
        }
        self.tokens = tokens
        self.anonymous = anonymous
    }

    /// The caller presenting `authorization` (the raw `Authorization` header), or nil (answer 401).
    ///
    /// - No service has a token (one app beside the sidecar): every request is the anonymous
    ///   service, whatever it carries; the official SDKs always send some key.
    /// - Otherwise a request with credentials must carry a service's token: one that matches no
    ///   service is a mistake, never the anonymous service. Only a request without credentials is
    ///   the anonymous service, if there is one.
    ///
    /// Every token is compared, in constant time, whatever matches first, so the time taken does
    /// not reveal which service (or how much of a token) matched.
    func caller(authorization: String?) -> Caller? {
        guard !tokens.isEmpty else { return anonymous }
        guard let authorization, !authorization.isEmpty else { return anonymous }
        guard let token = Self.bearerToken(authorization) else { return nil }
        let given = Array(token.utf8)
        var found: Caller?
        for entry in tokens where ConstantTime.equal(given, entry.token) && found == nil {
            found = entry.caller
        }
        return found
    }

    /// The credentials of `Bearer <token>` (the scheme is case-insensitive, RFC 9110 §11.1).
    package static func bearerToken(_ header: String) -> Substring? {
        let parts = header.split(separator: " ", maxSplits: 1, omittingEmptySubsequences: true)
        guard parts.count == 2, parts[0].lowercased() == "bearer" else { return nil }
        return parts[1]
    }
}
