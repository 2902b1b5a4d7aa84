/// Which event types a service receives: `*`, a family such as `verification.*`, or exact names.
/// The sidecar's own events (`sidecar.…`) are opt-in: only a pattern that names them matches them,
/// never `*`, so adding them changed nothing for existing services.
package struct EventFilter: Sendable, Equatable {
    /// The patterns as configured.
    package let patterns: [String]

    /// Every event type.
    package static let all = EventFilter(["*"])

    package init(_ patterns: [String]) { self.patterns = patterns }

    /// Whether an event of `type` passes the filter.
    package func matches(_ type: String) -> Bool {
        let own = type.hasPrefix(Self.sidecarPrefix)
        return patterns.contains { pattern in
            if pattern == "*" { return !own }
            if pattern.hasSuffix(".*") { return type.hasPrefix(pattern.dropLast()) }
            return pattern == type
        }
    }

    /// The family of the sidecar's own operational events.
    package static let sidecarPrefix = "sidecar."

    /// The sidecar's own operational events.
    package static let deadDelivery = "sidecar.delivery.dead"
    package static let servicePaused = "sidecar.service.paused"
    package static let serviceResumed = "sidecar.service.resumed"

    /// The event types Kora documents or SDKs show, and the sidecar's own: a name outside them is
    /// likely a typo (it is allowed, with a warning: Kora may send types it does not document).
    package static let knownTypes: Set<String> = [
        "verification.completed", "verification.verified", "verification.approved", "verification.rejected",
        "verification.expired", "fraud_alert.created", deadDelivery, servicePaused, serviceResumed,
    ]

    /// The patterns that match none of ``knownTypes``: a name that is none of them, a family none is in.
    package var unknownPatterns: [String] {
        patterns.filter { $0 != "*" && !Self.knownTypes.contains(where: Self(pattern: $0).matches) }
    }

    private init(pattern: String) { self.patterns = [pattern] }

    /// Why `pattern` can match no event, or nil when it is `*`, a family (`name.*`) or a name: a
    /// misspelt pattern would leave its service without events and nothing would say so.
    package static func problem(with pattern: String) -> String? {
        let name = pattern.hasSuffix(".*") ? pattern.dropLast(2) : Substring(pattern)
        if pattern == "*" { return nil }
        guard !name.isEmpty, name.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F && $0 != UInt8(ascii: "*") }) else {
            return "must be \"*\", a family such as \"verification.*\", or an event type, without spaces or another \"*\""
        }
        if pattern.hasPrefix(sidecarPrefix), !knownTypes.contains(where: { $0.hasPrefix(sidecarPrefix) && EventFilter(pattern: pattern).matches($0) }) {
            return "is none of the sidecar's own events (\(deadDelivery), \(servicePaused), \(serviceResumed))"
        }
        return nil
    }
}
