/// A request path as a log line may show it.
enum LoggedPath {
    /// `path` with the segment after `subjects` masked: in Kora's `/subjects/{externalId}/…` it is
    /// an external id, a service's own name for a person, which logs never carry. `Subjects` and
    /// `%73ubjects` count too: the proxy forwards whatever a caller spelt.
    static func masking(_ path: String) -> String {
        var segments = path.split(separator: "/", omittingEmptySubsequences: false)
        for index in segments.indices.dropFirst() where isSubjects(segments[index - 1]) { segments[index] = "{externalId}" }
        return segments.joined(separator: "/")
    }

    private static func isSubjects(_ segment: Substring) -> Bool {
        (segment.percentDecoded ?? String(segment)).lowercased() == "subjects"
    }
}
