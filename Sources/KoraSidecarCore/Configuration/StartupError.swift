/// A start-up failure the operator can fix, as one sentence naming the file, key or address.
package struct StartupError: Error, Sendable, CustomStringConvertible {
    package var description: String

    package init(_ description: String) { self.description = description }
}
