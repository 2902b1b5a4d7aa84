/// One thing wrong with the configuration: where (a JSON path such as `$.webhooks.secrets[0]`) and why.
public struct ConfigurationProblem: Sendable, Equatable, CustomStringConvertible {
    package var path: String
    package var reason: String

    package init(path: String, reason: String) {
        self.path = path
        self.reason = reason
    }

    public var description: String { "\(path): \(reason)" }
}

/// Every problem found in one configuration, reported together so that one run shows them all.
public struct ConfigurationError: Error, Sendable, CustomStringConvertible {
    /// The file the configuration came from, or a description of the environment.
    package var source: String
    public var problems: [ConfigurationProblem]

    package init(source: String, problems: [ConfigurationProblem]) {
        self.source = source
        self.problems = problems
    }

    public var description: String {
        let count = problems.count == 1 ? "1 problem" : "\(problems.count) problems"
        return (["\(source) has \(count):"] + problems.map { "  \($0)" }).joined(separator: "\n")
    }
}
