/// A path in a JSON document whose value is removed before delivery (`deliver.redact`): member
/// names separated by dots, `*` standing for every member at its level, as in `data.metadata`,
/// `data.scores.*` or `verification.externalId`.
package struct RedactionPath: Sendable, Equatable, CustomStringConvertible {
    package let segments: [String]

    /// Nil when `text` has an empty segment.
    package init?(_ text: String) {
        let segments = text.split(separator: ".", omittingEmptySubsequences: false).map(String.init)
        guard !text.isEmpty, segments.allSatisfy({ !$0.isEmpty }) else { return nil }
        self.segments = segments
    }

    package var description: String { segments.joined(separator: ".") }
}

extension JSONValue {
    /// This value without what `paths` name (a path that names nothing removes nothing).
    package func removing(_ paths: [RedactionPath]) -> JSONValue {
        paths.reduce(self) { value, path in value.removing(path.segments[...]) }
    }

    private func removing(_ path: ArraySlice<String>) -> JSONValue {
        guard let first = path.first, case .object(let members) = self else { return self }
        let rest = path.dropFirst()
        return .object(
            members.compactMap { member in
                guard first == "*" || member.key == first else { return member }
                if rest.isEmpty { return nil }
                return JSONMember(member.key, member.value.removing(rest))
            })
    }
}
