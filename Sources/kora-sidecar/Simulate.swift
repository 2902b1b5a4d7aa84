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

/// `kora-sidecar simulate`: a local stand-in for the Kora IDV API.
struct Simulate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a local stand-in for the Kora IDV API at /api/v1/idv (sandbox outcomes, signed webhooks).")

    @Option(help: "Port to listen on (0 picks a free one).") var port: Int = 8090
    @Option(help: "Address to bind.") var host: String = "127.0.0.1"
    @Option(name: .customLong("webhook-secret"), help: "Secret that signs the webhooks (whsec_...).") var webhookSecret: String
    @Option(name: .customLong("webhook-url"), help: "Tenant-wide (dashboard) webhook URL; events also go to each callbackUrl.")
    var webhookURL: String?
    @Option(name: .customLong("auto-complete"), help: "Complete every verification this many seconds after it is created.")
    var autoComplete: Double?
    @Option(
        name: .customLong("rate-limit"),
        help: "Requests allowed per minute; the rest are answered 429 (Kora's plans: 10, 50, 200; default: 100000).")
    var rateLimit: Int?
    @Option(name: .customLong("api-key"), help: "Accept only this API key (repeatable; default: any Bearer key).")
    var apiKeys: [String] = []
    @Option(name: .customLong("tenant-id"), help: "Accept only this X-Tenant-ID (others get 403; default: any).") var tenantID: String?
    @Option(name: .customLong("slow-delay"), help: "Seconds a test-slow- verification takes to decide.") var slowDelay: Double = 10

    func validate() throws {
        if !(0...65535).contains(port) { throw ValidationError("--port must be between 0 and 65535.") }
        if let rateLimit, rateLimit < 1 { throw ValidationError("--rate-limit must be at least 1.") }
        if let autoComplete, !(0...86_400).contains(autoComplete) { throw ValidationError("--auto-complete must be from 0 to 86400 seconds.") }
        if !(0...86_400).contains(slowDelay) { throw ValidationError("--slow-delay must be from 0 to 86400 seconds.") }
        if let problem = webhookURL.flatMap({ HTTPURL.problem($0, credentials: true) }) { throw ValidationError("--webhook-url \(problem).") }
    }

    func run() async throws {
        var configuration = SimulatorConfiguration(webhookSecret: Secret(webhookSecret))
        configuration.host = host
        configuration.port = port
        configuration.webhookURL = webhookURL
        configuration.apiKeys = apiKeys
        configuration.tenantID = tenantID
        configuration.autoComplete = autoComplete.map { .milliseconds(Int64($0 * 1000)) }
        if let rateLimit { configuration.rateLimitPerMinute = rateLimit }
        configuration.slowDelay = .milliseconds(Int64(slowDelay * 1000))
        var logger = Logger(label: "kora-sidecar.simulate")
        logger.logLevel = .info
        let app = buildSimulator(configuration: configuration, logger: logger) { address in
            let url = "http://\(address?.ipAddress ?? host):\(address?.port ?? port)/api/v1/idv"
            StandardStreams.writeLine("Kora simulator listening on \(url)", to: StandardStreams.output)
        }
        do {
            try await app.runService()
        } catch {
            throw StartupError("The simulator stopped: \(error).")
        }
    }
}
