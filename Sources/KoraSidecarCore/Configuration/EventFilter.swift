/// Which event types a service receives: `*`, a family such as `verification.*`, or exact names.
package struct EventFilter: Sendable, Equatable {
    /// The patterns as configured.
    package let patterns: [String]

    /// Every event type.
    package static let all = EventFilter(["*"])

    package init(_ patterns: [String]) { self.patterns = patterns }

    /// Whether an event of `type` passes the filter.
    package func matches(_ type: String) -> Bool {
        patterns.contains { pattern in
            if pattern == "*" { return true }
            if pattern.hasSuffix(".*") { return type.hasPrefix(pattern.dropLast()) }
            return pattern == type
        }
    }
}
