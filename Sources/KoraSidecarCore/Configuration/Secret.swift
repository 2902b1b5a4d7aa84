#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Where a secret comes from, as written in the configuration file.
public enum SecretSource: Sendable, Equatable {
    /// `{"env": "NAME"}`: an environment variable.
    case environment(String)
    /// `{"file": "/run/secrets/name"}`: a file, trailing newline trimmed.
    case file(String)
    /// A plain string in the file: for local use only.
    case literal
}

/// A resolved secret. It never prints its value: `description` is `***`, so an accidental
/// interpolation into a log line or an error cannot leak it.
public struct Secret: Sendable, Equatable, CustomStringConvertible, CustomDebugStringConvertible {
    /// The secret's value; read it only where the secret is used.
    package let value: String
    /// Where it was read from.
    package let source: SecretSource

    /// Creates a secret from a value known in code (tests, the demo).
    public init(_ value: String, source: SecretSource = .literal) {
        self.value = value
        self.source = source
    }

    /// The UTF-8 bytes of the value.
    package var bytes: [UInt8] { Array(value.utf8) }

    /// Whether the value was read: false for a reference loaded without resolving (commands that
    /// need the store alone), whose value is empty and must not be checked.
    var isResolved: Bool { !value.isEmpty }

    public var description: String { "***" }
    public var debugDescription: String { "***" }
}
