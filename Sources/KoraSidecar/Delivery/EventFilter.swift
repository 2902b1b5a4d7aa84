/// Which event types a service receives: `*`, a family such as `verification.*`, or exact names.
public struct EventFilter: Sendable, Equatable {
    /// The patterns as configured.
    public let patterns: [String]

    /// Every event type.
    public static let all = EventFilter(["*"])

    public init(_ patterns: [String]) { self.patterns = patterns }

    /// Whether an event of `type` passes the filter.
    public func matches(_ type: String) -> Bool {
        patterns.contains { pattern in
            if pattern == "*" { return true }
            if pattern.hasSuffix(".*") { return type.hasPrefix(pattern.dropLast()) }
            return pattern == type
        }
    }
}
