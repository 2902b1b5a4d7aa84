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
}
