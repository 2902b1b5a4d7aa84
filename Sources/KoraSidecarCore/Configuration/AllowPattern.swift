/// One `allow` entry of a service (SPEC §5.2): `METHOD /path`, where the method may be `*`, a `*`
/// segment matches exactly one path segment, and a final `**` matches the rest of the path.
/// Paths are relative to the Kora base, e.g. `GET /verifications/*`.
public struct AllowPattern: Sendable, Equatable {
    package let method: String
    package let segments: [Substring]

    /// Parses a pattern; nil when it is not `METHOD /path`.
    public init?(_ text: String) {
        let parts = text.split(separator: " ", omittingEmptySubsequences: true)
        guard parts.count == 2, parts[1].hasPrefix("/") else { return nil }
        let method = parts[0].uppercased()
        guard method == "*" || method.allSatisfy({ $0.isASCII && $0.isLetter }) else { return nil }
        let segments = parts[1].split(separator: "/", omittingEmptySubsequences: true)
        if let index = segments.firstIndex(of: "**"), index != segments.count - 1 { return nil }
        self.method = method
        self.segments = segments
    }

    /// Whether a call of `method` to `path` (relative to the Kora base, without query) is allowed.
    package func matches(method: String, path: String) -> Bool {
        guard self.method == "*" || self.method == method.uppercased() else { return false }
        let given = path.split(separator: "/", omittingEmptySubsequences: true)
        for (index, segment) in segments.enumerated() {
            if segment == "**" { return given.count > index }
            guard index < given.count, segment == "*" || segment == given[index] else { return false }
        }
        return given.count == segments.count
    }
}
