import AsyncHTTPClient
import Foundation
import Hummingbird
import Logging
import NIOCore
import NIOHTTP1
import ServiceLifecycle

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

/// A sidecar running in this process on real loopback listeners bound to port 0.
struct RunningSidecar: Sendable {
    let webhookPort: Int
    let internalPort: Int?
    let internalAddress: SocketAddress?

    var webhookURL: String { "http://127.0.0.1:\(webhookPort)/webhooks/koraidv" }
    func webhookBase(_ path: String) -> String { "http://127.0.0.1:\(webhookPort)\(path)" }
    func internalURL(_ path: String) -> String { "http://127.0.0.1:\(internalPort ?? 0)\(path)" }
}

/// A configuration for tests: both listeners on 127.0.0.1 port 0, the given secrets and services.
func testConfiguration(
    secrets: [String] = [TestSecrets.webhook], services: [ServiceConfiguration] = [], mode: DeliveryMode = .direct
) -> SidecarConfiguration {
    var webhooks = WebhookConfiguration(secrets: secrets.map { Secret($0) })
    webhooks.listen = .tcp(host: "127.0.0.1", port: 0)
    var configuration = SidecarConfiguration(webhooks: webhooks, services: services)
    configuration.internal.listen = .tcp(host: "127.0.0.1", port: 0)
    configuration.delivery.mode = mode
    return configuration
}

/// A service delivering to `target`, signed with the test signing secret.
func testService(
    _ name: String, target: DeliveryTarget, format: DeliveryFormat = .normalized, events: [String] = ["*"]
) -> ServiceConfiguration {
    var deliver = DeliverConfiguration(target: target)
    deliver.format = format
    deliver.signingSecret = Secret(TestSecrets.signing)
    deliver.events = EventFilter(events)
    deliver.timeoutSeconds = 5 * Sanitizer.slowdown
    return ServiceConfiguration(name: name, token: Secret("token-\(name)-\(TestSecrets.unique)"), deliver: deliver)
}

/// Secret values used in tests; the hygiene checks look for them in every output.
enum TestSecrets {
    static let webhook = "whsec_kora_test_webhook_secret_0001"
    static let rotated = "whsec_kora_test_webhook_secret_0002"
    /// A Standard Webhooks secret (base64 of 24 bytes).
    static let signing = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    static let unique = String(UInt32.random(in: 0...UInt32.max), radix: 36)
    /// A `storage.encryption.keys` key: 32 bytes in base64.
    static let encryptionKey = "S29yYVNpZGVjYXJUZXN0S2V5MzJCeXRlc0xvbmchISE="
}

extension DataProtection {
    /// Sealed with ``TestSecrets/encryptionKey`` under id `test`, as a process configured with it seals.
    static let sealedForTests = DataProtection(sealer: PayloadSealer(keys: [SealingKey(id: "test", base64: TestSecrets.encryptionKey)!]))
}

/// Runs a sidecar built from `configuration` for the duration of `body`, then shuts it down gracefully.
func withSidecar(
    _ configuration: SidecarConfiguration, options: SidecarOptions = .init(), logs: TestLogs = TestLogs(),
    _ body: @Sendable (RunningSidecar) async throws -> Void
) async throws {
    var options = options
    let (stream, continuation) = AsyncStream.makeStream(of: (ListenerRole, SocketAddress?).self)
    options.onListening = { role, address in continuation.yield((role, address)) }
    let app = try buildApplication(configuration, logger: logs.logger(), options: options)
    let group = ServiceGroup(configuration: .init(services: [app], logger: Logger(label: "test-group") { _ in SwiftLogNoOpLogHandler() }))
    try await withThrowingTaskGroup(of: Void.self) { tasks in
        tasks.addTask { try await group.run() }
        var addresses: [ListenerRole: SocketAddress?] = [:]
        for await (role, address) in stream {
            addresses[role] = address
            if addresses.count == 2 { break }
        }
        let running = RunningSidecar(
            webhookPort: addresses[.webhooks]??.port ?? 0, internalPort: addresses[.internal]??.port,
            internalAddress: addresses[.internal] ?? nil)
        do {
            try await body(running)
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
        } catch {
            await group.triggerGracefulShutdown()
            try? await tasks.waitForAll()
            throw error
        }
    }
}

/// What a webhook POST got back.
struct WebhookAnswer: Sendable {
    let status: Int
    let body: String
    let json: JSONValue?
    var headers = HTTPHeaders()

    var code: String? { json?["code"]?.text }
}

/// Posts `body` with `headers` to `url` and returns the answer.
func post(_ url: String, body: [UInt8], headers: [(String, String)], timeout: Duration = .seconds(30)) async throws -> WebhookAnswer {
    var request = HTTPClientRequest(url: url)
    request.method = .POST
    request.headers.add(name: "Content-Type", value: "application/json")
    // Test servers come and go on reused ports: a pooled connection to a dead one must not be reused.
    request.headers.add(name: "Connection", value: "close")
    for (name, value) in headers { request.headers.add(name: name, value: value) }
    request.body = .bytes(ByteBuffer(bytes: body))
    let response = try await HTTPClient.shared.execute(request, timeout: .milliseconds((timeout * Sanitizer.slowdown).milliseconds))
    let answer = try await response.body.collect(upTo: 1 << 20)
    let bytes = Array(answer.readableBytesView)
    return WebhookAnswer(
        status: Int(response.status.code), body: String(decoding: bytes, as: UTF8.self), json: try? JSONParser.parse(bytes), headers: response.headers)
}

/// GETs `url` and returns the answer.
func get(_ url: String, headers: [(String, String)] = [], method: HTTPRequest.Method = .get) async throws -> WebhookAnswer {
    var request = HTTPClientRequest(url: url)
    request.method = .init(rawValue: method.rawValue)
    request.headers.add(name: "Connection", value: "close")
    for (name, value) in headers { request.headers.add(name: name, value: value) }
    let response = try await HTTPClient.shared.execute(request, timeout: .seconds(30))
    let answer = try await response.body.collect(upTo: 1 << 20)
    let bytes = Array(answer.readableBytesView)
    return WebhookAnswer(
        status: Int(response.status.code), body: String(decoding: bytes, as: UTF8.self), json: try? JSONParser.parse(bytes), headers: response.headers)
}

/// Signs `body` as Kora does and posts it to the sidecar.
func sendSigned(
    _ body: [UInt8], to sidecar: RunningSidecar, secret: String = TestSecrets.webhook, scheme: SignatureScheme = .timestamped,
    timestamp: Int64 = UnixTime.now().seconds, extra: [(String, String)] = [], timeout: Duration = .seconds(30)
) async throws -> WebhookAnswer {
    let headers = KoraSignature.headers(scheme: scheme, secret: Secret(secret), body: body, timestamp: timestamp)
    return try await post(sidecar.webhookURL, body: body, headers: headers.map { ($0.name, $0.value) } + extra, timeout: timeout)
}
