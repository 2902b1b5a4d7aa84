import NIOConcurrencyHelpers
import Logging

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

/// Captures log lines as the production handler renders them, so tests can read what operators see.
final class TestLogs: Sendable {
    private let lines = NIOLockedValueBox<[String]>([])

    /// A logger writing JSON lines into this capture.
    func logger(level: Logger.Level = .debug) -> Logger {
        Logger(label: "test") { _ in CapturingHandler(logs: self, level: level) }
    }

    func append(_ line: String) { lines.withLockedValue { $0.append(line) } }

    /// Every line captured so far.
    var all: [String] { lines.withLockedValue { $0 } }

    private struct CapturingHandler: LogHandler {
        let logs: TestLogs
        var logLevel: Logger.Level
        var metadata: Logger.Metadata = [:]

        init(logs: TestLogs, level: Logger.Level) {
            self.logs = logs
            self.logLevel = level
        }

        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }

        func log(event: LogEvent) {
            var merged = metadata
            merged.merge(event.metadata ?? [:]) { $1 }
            let fields = merged.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
            logs.append("\(event.level) \(event.message) \(fields)")
        }
    }
}
