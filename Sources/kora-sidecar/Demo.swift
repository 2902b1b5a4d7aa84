import ArgumentParser
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import KoraSidecar
import KoraSidecarCore
import KoraSimulator
import Logging

/// `kora-sidecar demo`: the sidecar, the Kora simulator and a receiving app in one process.
struct Demo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the sidecar, a Kora simulator and a receiving app, and walk one verification per sandbox outcome through every hop.")

    @Flag(name: .customLong("keep-running"), help: "Stay up afterwards and print commands to try (Ctrl-C stops).")
    var keepRunning = false

    func run() async throws {
        var options = DemoOptions()
        options.keepRunning = keepRunning
        var logger = Logger(label: "kora-sidecar.demo") { label in
            SidecarLogHandler(label: label, level: .error, format: .text)
        }
        logger.logLevel = .error
        // Written unbuffered: with --keep-running the output is read while the process still runs.
        let passed = try await runDemo(options: options, logger: logger) { line in
            StandardStreams.writeLine(line, to: StandardStreams.output)
        }
        if !passed { throw ExitCode.failure }
    }
}
