import KoraSidecarCore

/// Which internal service is calling the API proxy (SPEC §5.2), and what it may call.
package struct ServiceIdentity: Sendable {
    /// One service as the proxy knows it.
    struct Caller: Sendable {
        /// The service's name (recorded as the origin of the verifications it creates).
        package let name: String
        /// Its `allow` patterns; nil allows everything.
        package let allow: [AllowPattern]?
        /// Whether it sees only the verifications it created (`deliver.onlyOwnVerifications`): in its
        /// events, and through the proxy too.
        let onlyOwnVerifications: Bool

        /// Whether the service may call `method` on `path` (relative to the Kora base).
        package func may(_ method: String, _ path: String) -> Bool {
            guard let allow else { return true }
            return allow.contains { $0.matches(method: method, path: path) }
        }
    }

    /// The services that have a token, and their tokens, in the same order.
    private let tokenCallers: [Caller]
    private let tokens: [[UInt8]]
    private let anonymous: Caller?

    /// Builds the table from `services`; the first service without a token is the anonymous caller
    /// (configuration validation allows at most one).
    package init(services: [ServiceConfiguration]) {
        var tokenCallers: [Caller] = []
        var tokens: [[UInt8]] = []
        var anonymous: Caller?
        for service in services {
            let caller = Caller(
                name: service.name, allow: service.allow.map { $0.compactMap(AllowPattern.init) },
                onlyOwnVerifications: service.deliver?.onlyOwnVerifications ?? false)
            if let token = service.token {
                tokenCallers.append(caller)
                tokens.append(token.bytes)
            } else if anonymous == nil {
                anonymous = caller
            }
        }
        self.tokenCallers = tokenCallers
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
        return ConstantTime.firstMatch(Array(token.utf8), in: tokens).map { tokenCallers[$0] }
    }

    /// The credentials of `Bearer <token>` (the scheme is case-insensitive, RFC 9110 §11.1).
    package static func bearerToken(_ header: String) -> Substring? {
        let parts = header.split(separator: " ", maxSplits: 1, omittingEmptySubsequences: true)
        guard parts.count == 2, parts[0].lowercased() == "bearer" else { return nil }
        return parts[1]
    }
}
