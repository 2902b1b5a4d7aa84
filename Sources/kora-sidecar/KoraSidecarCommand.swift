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

/// `kora-sidecar`: parses the command line, builds, runs. All behaviour lives in the library.
@main
struct KoraSidecarCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kora-sidecar",
        abstract: "Owns every contact between an application and the Kora IDV API.",
        subcommands: [
            Serve.self, CheckConfig.self, CheckKora.self, Sign.self, SendTestEvent.self, Deliveries.self, Erase.self, Reseal.self,
            Simulate.self, Demo.self,
        ]
    )

    /// Runs the command and maps failures to the exit codes of SPEC §2: 1 for a problem the user
    /// can fix (one clear message), 2 for a usage error.
    static func main() async {
        do {
            var command = try parseAsRoot()
            if var command = command as? any AsyncParsableCommand {
                try await command.run()
            } else {
                try command.run()
            }
        } catch let error as ConfigurationError {
            fail(error.description, code: 1)
        } catch let error as StartupError {
            fail(error.description, code: 1)
        } catch {
            let code = exitCode(for: error)
            if code == .success || code == .failure {
                exit(withError: error)
            }
            fail(fullMessage(for: error), code: 2)
        }
    }

    static func fail(_ message: String, code: Int32) -> Never {
        StandardStreams.writeLine(message, to: StandardStreams.error)
        exitProcess(code)
    }
}

/// The process environment, read once here and passed down.
var processEnvironment: [String: String] { ProcessInfo.processInfo.environment }

struct ConfigOption: ParsableArguments {
    @Option(
        name: .long,
        help: "Configuration file (default: $KORA_SIDECAR_CONFIG, else ./config.json, else /etc/kora-sidecar/config.json, else the environment).")
    var config: String?

    var source: ConfigurationSource { ConfigurationSource.resolve(flag: config, environment: processEnvironment) }

    func load(resolvingSecrets: Bool = true) throws -> SidecarConfiguration {
        try source.load(environment: processEnvironment, resolvingSecrets: resolvingSecrets)
    }

    /// What start-up says of the environment beside the configuration it read.
    var environmentWarnings: [String] { source.warnings(environment: processEnvironment) }
}

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Run the sidecar.")

    @OptionGroup var options: ConfigOption

    func run() async throws {
        let configuration = try options.load()
        let level = Logger.Level(rawValue: configuration.logging.level) ?? .info
        LoggingSystem.bootstrap { label in
            SidecarLogHandler(label: label, level: level, format: configuration.logging.format)
        }
        let logger = Logger(label: "kora-sidecar")
        for warning in options.environmentWarnings { logger.warning("\(warning)") }
        let app = try buildApplication(configuration, logger: logger)
        // Once it can start: a start-up failure stays one sentence.
        logger.info("Configuration read", metadata: ["source": "\(options.source.description)"])
        do {
            try await app.runService()
        } catch {
            logger.critical("Stopped on an error", metadata: ["error": "\(error)"])
            throw StartupError.stopped(by: error)
        }
        logger.info("Stopped")
    }
}

struct CheckConfig: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check-config", abstract: "Validate the configuration and print it with secrets masked.")

    @OptionGroup var options: ConfigOption

    func run() async throws {
        let configuration = try options.load()
        // The files serve reads at start-up, read here too: a missing certificate is found before the deploy.
        try configuration.checkCertificateFiles()
        print(JSONWriter.prettyString(configuration.effectiveJSON))
        for warning in configuration.startupWarnings + options.environmentWarnings {
            StandardStreams.writeLine("warning: \(warning)", to: StandardStreams.error)
        }
    }
}

struct CheckKora: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check-kora",
        abstract: "Go-live check: is Kora reachable, and does it accept the configured key and tenant? Exit 0 when all are.")

    @OptionGroup var options: ConfigOption

    func run() async throws {
        let configuration = try options.load()
        let report = await KoraCheck.run(configuration.kora)
        for line in report.lines { print(line) }
        if !report.passed { throw ExitCode.failure }
    }
}

/// The webhook secret of `sign` and `send-test-event`: `$KORAIDV_WEBHOOK_SECRET`, the variable
/// serve reads it from, or `--secret`, which `ps` shows to every user of the machine.
struct WebhookSecretOption: ParsableArguments {
    @Option(help: "The webhook secret (default: $KORAIDV_WEBHOOK_SECRET, which, unlike an argument, other users cannot see in ps).")
    var secret: String?

    /// Checked with the arguments, so that the error comes with the command's own usage.
    func validate() throws { _ = try resolve() }

    func resolve() throws -> Secret {
        guard let value = secret ?? processEnvironment["KORAIDV_WEBHOOK_SECRET"], !value.isEmpty else {
            throw ValidationError("Set KORAIDV_WEBHOOK_SECRET to the webhook secret, or give --secret.")
        }
        return Secret(value)
    }
}

struct Sign: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print Kora's signature headers for a body.")

    @OptionGroup var webhookSecret: WebhookSecretOption
    @Option(help: "timestamped or legacy.") var scheme: SignatureScheme = .timestamped
    @Option(help: "Unix seconds (default: now).") var timestamp: Int64?
    @Argument(help: "File holding the body (default: standard input).") var file: String?

    func run() async throws {
        let body: [UInt8]
        if let file {
            guard let data = FileManager.default.contents(atPath: file) else { throw StartupError("The file \(file) cannot be read.") }
            body = Array(data)
        } else {
            body = try StandardStreams.readInput()
        }
        let headers = KoraSignature.headers(
            scheme: scheme, secret: try webhookSecret.resolve(), body: body, timestamp: timestamp ?? UnixTime.now().seconds)
        for header in headers { print("\(header.name): \(header.value)") }
    }
}

struct SendTestEvent: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "send-test-event", abstract: "Build a realistic Kora event, sign it and POST it.")

    @Option(help: "The sidecar's webhook URL.") var to: String
    @OptionGroup var webhookSecret: WebhookSecretOption
    @Option(help: "Event type.") var type: String = "verification.completed"
    @Option(help: "auto_approve, auto_reject or manual_review (default: the one the type says, auto_approve for most).") var decision: String?
    @Option(name: .customLong("external-id"), help: "The verification's externalId.") var externalID: String = "user-123"
    @Option(help: "timestamped or legacy.") var scheme: SignatureScheme = .timestamped

    func validate() throws {
        if let problem = HTTPURL.problem(to) { throw ValidationError("--to \(problem).") }
        if let decision, !TestEvent.decisions.contains(decision) {
            throw ValidationError("--decision must be one of \(TestEvent.decisions.joined(separator: ", ")).")
        }
    }

    func run() async throws {
        let body = TestEvent.body(type: type, decision: decision ?? TestEvent.decision(for: type), externalID: externalID)
        let secret = try webhookSecret.resolve()
        let answer: (status: Int, body: String)
        do {
            answer = try await TestEvent.send(body: body, to: to, secret: secret, scheme: scheme)
        } catch {
            throw StartupError("The event could not be sent to \(to): \(HTTPClientFailure.describe(error)).")
        }
        print("\(answer.status) \(answer.body)")
        // Any answer but a 2xx means the event was not taken, as Kora would see it.
        if !(200..<300).contains(answer.status) { throw ExitCode.failure }
    }
}

struct Deliveries: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Inspect and re-queue stored deliveries (works while serve runs, on the store serve uses).",
        subcommands: [List.self, Show.self, Retry.self, Replay.self])

    static func run(_ action: DeliveriesCommand.Action, options: ConfigOption) async throws {
        // Only the store's path is needed: an operator need not hold Kora's secrets to list deliveries.
        let configuration = try options.load(resolvingSecrets: false)
        let quiet = Logger(label: "kora-sidecar", factory: { _ in SwiftLogNoOpLogHandler() })
        // What an operator changes is logged as serve logs (erasure's audit line); listings log nothing.
        let logger: Logger
        switch action {
        case .erase, .reseal:
            let level = Logger.Level(rawValue: configuration.logging.level) ?? .info
            logger = Logger(label: "kora-sidecar") { SidecarLogHandler(label: $0, level: level, format: configuration.logging.format) }
        default:
            logger = quiet
        }
        // A name no service has may be a typo, or a service since removed (its deliveries stay stored): said, then done.
        if let service = action.service, !configuration.services.contains(where: { $0.name == service }) {
            let names = configuration.services.map(\.name).joined(separator: ", ")
            StandardStreams.writeLine(
                "warning: no configured service is named \(service) (configured: \(names.isEmpty ? "none" : names)); its stored deliveries are used anyway.",
                to: StandardStreams.error)
        }
        let output = try await configuration.storage.withStore(logger: quiet) { store in
            try await DeliveriesCommand.run(action, store: store, services: configuration.deliveryServices, logger: logger)
        }
        print(output)
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List deliveries (newest first) as JSON, or quarantined payloads, or events no service took (unrouted).")

        @OptionGroup var options: ConfigOption
        @Option(help: "pending, delivered, dead, quarantined or unrouted.") var status: String?
        @Option(help: "Only deliveries to this service.") var service: String?
        @Option(help: "At most this many (1 to 100000).") var limit: Int = 100

        func validate() throws {
            // SQLite reads a negative LIMIT as none: the whole table, into memory.
            if !(1...100_000).contains(limit) { throw ValidationError("--limit must be from 1 to 100000.") }
            // A usage error, exit 2 as for `retry --status`, before any store is opened.
            if let status, OperatorActions.Listing(rawValue: status) == nil {
                throw ValidationError("--status must be \(OperatorActions.Listing.choices), not \(status).")
            }
            if service != nil, ["quarantined", "unrouted"].contains(status) {
                throw ValidationError("--service selects deliveries: \(status ?? "") entries have no service.")
            }
        }

        func run() async throws { try await Deliveries.run(.list(status: status, service: service, limit: limit), options: options) }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show one delivery with every attempt (status, time, duration, error).")

        @OptionGroup var options: ConfigOption
        @Argument(help: "Delivery id.") var id: Int64

        func run() async throws { try await Deliveries.run(.show(id: id), options: options) }
    }

    struct Retry: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Queue one delivery again, or every delivery (or unrouted event) a filter selects; --dry-run counts them.")

        @OptionGroup var options: ConfigOption
        @Argument(help: "Delivery id.") var id: Int64?
        @Flag(name: .customLong("all-dead"), help: "Re-queue every dead delivery (the same as --status dead).") var allDead = false
        @Flag(help: "Route every unrouted event again (the same as --status unrouted).") var unrouted = false
        @Option(help: "dead, delivered or unrouted: what to retry.") var status: String?
        @Option(help: "Only deliveries to this service.") var service: String?
        @Option(help: "Only events of this type.") var type: String?
        @Option(help: "Only events of this verification id.") var verification: String?
        @Option(help: "Accepted at or after: an ISO 8601 time (2026-11-30T09:00:00Z) or a duration ago (24h).") var since: String?
        @Option(help: "Accepted before: an ISO 8601 time or a duration ago.") var until: String?
        @Flag(name: .customLong("dry-run"), help: "Print how many would be re-queued; change nothing.") var dryRun = false

        func validate() throws {
            let bulk = allDead || unrouted || status != nil
            if (id != nil) == bulk || [allDead, unrouted, status != nil].filter({ $0 }).count > 1 {
                throw ValidationError("Give one of: a delivery id, --status, --all-dead or --unrouted.")
            }
            if id != nil, service != nil || type != nil || verification != nil || since != nil || until != nil || dryRun {
                throw ValidationError("Filters and --dry-run go with --status, --all-dead or --unrouted, not with a delivery id.")
            }
            // Here rather than in run(), so that a mistake is told with this command's usage.
            if id == nil { _ = try selection() }
        }

        func run() async throws {
            if let id { return try await Deliveries.run(.retry(id: id), options: options) }
            try await Deliveries.run(.retryAll(try selection()), options: options)
        }

        private func selection() throws -> OperatorActions.RetrySelection {
            let status = status ?? (allDead ? "dead" : "unrouted")
            let filter = DeliveryFilter(
                statuses: [], service: service, eventType: type, verificationID: verification, since: try time("--since", since),
                until: try time("--until", until))
            guard let selection = OperatorActions.RetrySelection(status: status, filter: filter, dryRun: dryRun) else {
                throw ValidationError("--status must be dead, delivered or unrouted, not \(status).")
            }
            return selection
        }

        private func time(_ flag: String, _ text: String?) throws -> UnixTime? {
            guard let text else { return nil }
            guard let time = UnixTime.parse(text, now: .now()) else {
                throw ValidationError("\(flag) must be an ISO 8601 time such as 2026-11-30T09:00:00Z, or a duration ago such as 24h.")
            }
            return time
        }
    }

    struct Replay: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Send an already delivered (or dead) event again, with the same webhook-id, to a service that lost its data.")

        @OptionGroup var options: ConfigOption
        @Argument(help: "The event id (webhook-id).") var eventID: String
        @Option(help: "Only to this service (default: every service that had it).") var service: String?

        func run() async throws { try await Deliveries.run(.replay(eventID: eventID, service: service), options: options) }
    }
}

struct Erase: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Delete everything stored about a verification, or about every verification of an external id (works while serve runs).",
        discussion: """
            Deletes, in one transaction, the events (bodies and metadata), their pending and finished deliveries, the \
            quarantined payloads that name it, the origin record and the idempotency records of its create. Prints what \
            it removed as JSON and logs one audit line with the verification ids. Event ids stay remembered, so that \
            Kora's retry of an erased event is not stored again.
            """)

    @OptionGroup var options: ConfigOption
    @Option(help: "The verification id.") var verification: String?
    @Option(name: .customLong("external-id"), help: "Your app's id for the person (externalId): every verification whose stored event names it.")
    var externalID: String?

    func validate() throws {
        guard (verification == nil) != (externalID == nil), !(verification ?? externalID ?? "").isEmpty else {
            throw ValidationError("Give one of --verification ID and --external-id X.")
        }
    }

    func run() async throws {
        let subject: OperatorActions.ErasureSubject = verification.map { .verification($0) } ?? .externalID(externalID ?? "")
        try await Deliveries.run(.erase(subject), options: options)
    }
}

struct Reseal: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Seal every stored body again with the first key of storage.encryption.keys (after a rotation; works while serve runs).")

    @OptionGroup var options: ConfigOption

    func run() async throws { try await Deliveries.run(.reseal, options: options) }
}

extension SignatureScheme: ExpressibleByArgument {}
