import NIOConcurrencyHelpers
import Foundation
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

/// The real `kora-sidecar` binary (built by `swift build --build-tests`).
enum Binary {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().path
    /// `KORA_SIDECAR_BINARY` overrides it (scripts/sanitize runs the sanitized build).
    static let path = ProcessInfo.processInfo.environment["KORA_SIDECAR_BINARY"] ?? root + "/.build/debug/kora-sidecar"

    /// Runs a command to completion and returns its exit status and output.
    static func run(
        _ arguments: [String], environment: [String: String] = [:], input: [UInt8]? = nil, directory: String? = nil
    ) async throws -> (status: Int32, stdout: String, stderr: String) {
        try await runTool(path, arguments, environment: environment, input: input, directory: directory)
    }
}

/// `kora-sidecar serve` as a child process, with its log lines captured.
final class SidecarProcess: @unchecked Sendable {
    private let process: Child
    private let lines = NIOLockedValueBox<[String]>([])
    /// Whether the log's pipe reached its end: every line the process wrote is in `lines`.
    private let logEnded = NIOLockedValueBox(false)

    /// Starts `serve --config config`, or with no flag at all when `config` is nil (the
    /// configuration is then found as an operator's shell would find it, from `directory`);
    /// through `launcher` when given (a program that runs the command after it, `prlimit` say).
    init(config: String?, environment: [String: String] = [:], directory: String? = nil, launcher: [String] = []) throws {
        let command = [Binary.path, "serve"] + (config.map { ["--config", $0] } ?? [])
        let program = launcher.first ?? command[0]
        process = try Child(
            program, Array((launcher + command).dropFirst()), environment: childEnvironment(environment, path: "/usr/bin:/bin"),
            directory: directory, error: .pipe)
        let fd = process.outputPipe!
        let lines = self.lines
        let logEnded = self.logEnded
        Thread {
            defer { logEnded.withLockedValue { $0 = true } }
            var buffer: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 65536)
            while true {
                let count = read(fd, &chunk, chunk.count)
                if count < 0, errno == EINTR { continue }
                if count <= 0 { break }
                buffer.append(contentsOf: chunk[0..<count])
                while let newline = buffer.firstIndex(of: 0x0A) {
                    let line = String(decoding: buffer[..<newline], as: UTF8.self)
                    buffer.removeSubrange(...newline)
                    lines.withLockedValue { $0.append(line) }
                }
            }
        }.start()
    }

    var pid: Int32 { process.pid }
    var log: [String] { lines.withLockedValue { $0 } }

    /// The ports the listeners bound, read from their `Listening` log lines.
    func ports(timeout: Duration = .seconds(20)) async throws -> (webhooks: Int, internal: Int) {
        let found = try await listenerPorts(["webhooks", "internal"], timeout: timeout)
        return (found["webhooks"]!, found["internal"]!)
    }

    /// The port of each of `listeners` (`webhooks`, `internal`, `metrics`), once all are bound.
    func listenerPorts(_ listeners: Set<String>, timeout: Duration = .seconds(20)) async throws -> [String: Int] {
        var found: [String: Int] = [:]
        try await waitUntil("the sidecar to listen", timeout: timeout) {
            for line in self.log {
                guard let json = try? JSONParser.parse(Array(line.utf8)), json["message"] == "Listening",
                    let listener = json["listener"]?.text, let address = json["address"]?.text,
                    let port = address.split(separator: ":").last.flatMap({ Int($0) })
                else { continue }
                found[listener] = port
            }
            return listeners.isSubset(of: found.keys) || !self.process.isRunning
        }
        guard listeners.isSubset(of: found.keys) else { throw TimedOut(what: "listening ports; log: \(log.suffix(5))") }
        return found
    }

    /// The listeners' addresses once both are bound, for the webhook helpers.
    func running() async throws -> RunningSidecar {
        let ports = try await ports()
        return RunningSidecar(webhookPort: ports.webhooks, internalPort: ports.internal, internalAddress: nil)
    }

    func signal(_ number: Int32) { process.signal(number) }

    /// Waits for the process to exit, and for its last log lines to be read, and returns its status.
    func exitStatus(timeout: Duration = .seconds(30)) async throws -> Int32 {
        try await waitUntil("the sidecar to exit", timeout: timeout) { !self.process.isRunning && self.logEnded.withLockedValue { $0 } }
        return process.exitStatus ?? -1
    }

    /// Expects the process to exit with status 0; on failure shows the end of its log (under a
    /// sanitizer, where the report of a leak or a race is).
    func expectCleanExit(_ sourceLocation: SourceLocation = #_sourceLocation) async throws {
        let status = try await exitStatus()
        #expect(status == 0, "exit status \(status); log ends: \(log.suffix(40).joined(separator: "\n"))", sourceLocation: sourceLocation)
    }

    /// The soft and hard limits of open files, from /proc.
    var openFileLimits: (soft: Int, hard: Int)? {
        guard let limits = try? String(contentsOfFile: "/proc/\(pid)/limits", encoding: .utf8),
            let line = limits.split(separator: "\n").first(where: { $0.hasPrefix("Max open files") })
        else { return nil }
        let fields = line.split(separator: " ", omittingEmptySubsequences: true).dropFirst(3).prefix(2).compactMap { Int($0) }
        return fields.count == 2 ? (fields[0], fields[1]) : nil
    }

    /// The resident set size in kilobytes, from /proc.
    var residentKilobytes: Int {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
            let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") })
        else { return 0 }
        return Int(line.split(separator: " ").dropFirst().first ?? "0") ?? 0
    }

    deinit {
        if process.isRunning {
            process.signal(SIGKILL)
            _ = process.waitForExit()
        }
    }
}

/// Writes a sidecar configuration for a child process: both listeners on 127.0.0.1 port 0,
/// `mode` delivery (queued unless given) to `receiverPort` (or to the `services` given as JSON), the store in `directory`
/// (or the PostgreSQL database at `postgresURL`). The default service's breaker is out of the way
/// (these tests are about durability and retries; the breaker has tests of its own).
func writeProcessConfig(
    directory: String, receiverPort: Int, retrySchedule: [String] = ["100ms", "100ms", "200ms"], extra: String = "", services: String? = nil,
    postgresURL: String? = nil, mode: DeliveryMode = .queued
) throws -> String {
    // Replicas share one key; with SQLite the key file beside the store is created on first start.
    let storage =
        postgresURL.map { #"{"postgresURL": "\#($0)", "encryption": {"keys": [{"id": "test", "key": "\#(TestSecrets.encryptionKey)"}]}}"# }
        ?? #"{"sqlitePath": "\#(directory)/store.sqlite"}"#
    let path = directory + "/config.json"
    let schedule = retrySchedule.map { "\"\($0)\"" }.joined(separator: ", ")
    let text = """
        {
          "webhooks": {"listen": {"host": "127.0.0.1", "port": 0}, "secrets": ["\(TestSecrets.webhook)"]},
          "internal": {"listen": {"host": "127.0.0.1", "port": 0}\(extra)},
          "services": \(services ?? #"[{"name": "app", "deliver": {"url": "http://127.0.0.1:\#(receiverPort)/events", "signingSecret": "\#(TestSecrets.signing)", "timeoutSeconds": 5, "breaker": {"failures": 1000}}}]"#),
          "delivery": {"mode": "\(mode.rawValue)", "retrySchedule": [\(schedule)], "concurrency": 8, "drainTimeout": "20s"},
          "storage": \(storage),
          "logging": {"level": "info", "format": "json"}
        }
        """
    try text.write(toFile: path, atomically: true, encoding: .utf8)
    return path
}
