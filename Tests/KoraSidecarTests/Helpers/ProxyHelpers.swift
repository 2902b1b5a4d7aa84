import NIOConcurrencyHelpers
import AsyncHTTPClient
import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import NIOHTTP1
import ServiceLifecycle

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

/// A client that never follows redirects (so a test sees what the proxy passed back) and opens a
/// fresh connection per request (servers come and go between tests).
let proxyTestClient: HTTPClient = {
    var configuration = HTTPClient.Configuration(redirectConfiguration: .disallow, timeout: .init(connect: .seconds(5 * Int64(Sanitizer.slowdown)), read: .seconds(60)))
    configuration.connectionPool = .init(idleTimeout: .milliseconds(1))
    return HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
}()

let quietLogger = Logger(label: "quiet") { _ in SwiftLogNoOpLogHandler() }

/// An HTTP answer as a test reads it.
struct HTTPAnswer: Sendable {
    let status: Int
    let headers: HTTPHeaders
    let bytes: [UInt8]

    var body: String { String(decoding: bytes, as: UTF8.self) }
    var json: JSONValue? { try? JSONParser.parse(bytes) }
    var code: String? { json?["code"]?.text }
    func header(_ name: String) -> String? { headers.first(name: name) }
}

/// Sends one request and reads the whole answer.
func request(
    _ method: HTTPMethod, _ url: String, headers: [(String, String)] = [], body: [UInt8]? = nil
) async throws -> HTTPAnswer {
    var request = HTTPClientRequest(url: url)
    request.method = method
    request.headers.add(name: "Connection", value: "close")
    for (name, value) in headers { request.headers.add(name: name, value: value) }
    if let body { request.body = .bytes(ByteBuffer(bytes: body)) }
    let response = try await proxyTestClient.execute(request, timeout: .seconds(60))
    let bytes = try await response.body.collect(upTo: 1 << 24)
    return HTTPAnswer(status: Int(response.status.code), headers: response.headers, bytes: Array(bytes.readableBytesView))
}

/// Calls the Kora API the way Kora's SDKs do: a base URL (here the sidecar's), `Authorization:
/// Bearer {apiKey}` (here the service token), `X-Tenant-ID`, JSON bodies, paths joined to the base.
struct SDKStyleClient: Sendable {
    let baseURL: String
    let apiKey: String?
    var tenantID = "tenant-the-sdk-was-given"

    func call(_ method: HTTPMethod, _ path: String, json: JSONValue? = nil, raw: [UInt8]? = nil, headers: [(String, String)] = [])
        async throws -> HTTPAnswer
    {
        var all: [(String, String)] = [("Accept", "application/json"), ("X-Tenant-ID", tenantID), ("User-Agent", "koraidv-python/1.0")]
        if let apiKey { all.append(("Authorization", "Bearer \(apiKey)")) }
        let body = raw ?? json.map(JSONWriter.encode)
        if body != nil { all.append(("Content-Type", "application/json")) }
        return try await request(method, baseURL + path, headers: all + headers, body: body)
    }

    func createVerification(externalID: String, extra: [JSONMember] = []) async throws -> HTTPAnswer {
        try await call(.POST, "/verifications", json: .object([JSONMember("externalId", .string(externalID))] + extra))
    }
}

/// Records the proxy's waits instead of waiting; `onSleep` runs during each (e.g. to start Kora).
final class SleepRecorder: Sendable {
    private let recorded = NIOLockedValueBox<[Duration]>([])
    private let onSleep: @Sendable (Int, Duration) async throws -> Void

    init(onSleep: @escaping @Sendable (Int, Duration) async throws -> Void = { _, _ in }) { self.onSleep = onSleep }

    var delays: [Duration] { recorded.withLockedValue { $0 } }

    var sleep: @Sendable (Duration) async throws -> Void {
        { duration in
            let index = self.recorded.withLockedValue { list in
                list.append(duration)
                return list.count
            }
            try await self.onSleep(index, duration)
        }
    }
}

/// A wall clock tests move by hand (the simulator's rate-limit window).
final class ManualClock: Sendable {
    private let now = NIOLockedValueBox(UnixTime(milliseconds: 1_800_000_000_000))

    func read() -> UnixTime { now.withLockedValue { $0 } }
    func advance(_ duration: Duration) { now.withLockedValue { $0 = $0.adding(duration) } }
}

/// A Kora that answers from a script: every request is recorded, then answered by the next reply
/// (an echo of what it received once the script is spent).
final class ScriptedKora: Sendable {
    enum Reply: Sendable {
        /// Status, headers and body.
        case answer(Int, [(String, String)], String)
        /// Status and an empty JSON body, with `header` holding the HTTP date `secondsAhead` from when it answers.
        case answerDated(Int, String, secondsAhead: Double)
        /// 200 with the request as JSON: method, path, query, headers, body length.
        case echo
        /// Closes the connection after the request was received, without answering.
        case close
        /// Does not answer until the test calls ``release()``.
        case stall
        /// Status and body once `gate` is opened.
        case answerWhenOpened(Gate, Int, String)
        /// Status and headers at once, then a body of a byte every 100 ms until the test calls ``release()``.
        case trickle(Int, [(String, String)])
    }

    struct Seen: Sendable {
        let method: String
        let path: String
        let query: String?
        let headers: [String: [String]]
        let bodyBytes: Int
        let body: [UInt8]

        func header(_ name: String) -> String? { headers[name.lowercased()]?.first }
    }

    private let script: NIOLockedValueBox<[Reply]>
    private let seen = NIOLockedValueBox<[Seen]>([])
    private let released = Gate()

    /// Lets stalled requests end.
    func release() { released.open() }

    init(_ script: [Reply] = []) { self.script = NIOLockedValueBox(script) }

    var requests: [Seen] { seen.withLockedValue { $0 } }

    private static func answer(_ status: Int, _ extra: [(String, String)], _ text: String) -> Response {
        var fields = HTTPFields()
        fields[.contentType] = "application/json"
        for (name, value) in extra { fields.append(HTTPField(name: HTTPField.Name(name)!, value: value)) }
        return Response(status: .init(code: status), headers: fields, body: .init(byteBuffer: ByteBuffer(string: text)))
    }

    fileprivate func respond(_ request: Request, context: SidecarRequestContext) async throws -> Response {
        let body = try await request.body.collect(upTo: 1 << 26)
        var headers: [String: [String]] = [:]
        for field in request.headers { headers[field.name.canonicalName, default: []].append(field.value) }
        let entry = Seen(
            method: request.method.rawValue, path: request.uri.path, query: request.uri.query, headers: headers, bodyBytes: body.readableBytes,
            body: Array(body.readableBytesView))
        seen.withLockedValue { $0.append(entry) }
        let reply = script.withLockedValue { $0.isEmpty ? Reply.echo : $0.removeFirst() }
        switch reply {
        case .answer(let status, let extra, let text):
            return Self.answer(status, extra, text)
        case .answerDated(let status, let header, let ahead):
            let formatter = DateFormatter()
            formatter.locale = Locale(identifier: "en_US_POSIX")
            formatter.timeZone = TimeZone(identifier: "GMT")
            formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss 'GMT'"
            return Self.answer(status, [(header, formatter.string(from: Date().addingTimeInterval(ahead)))], "{}")
        case .echo:
            let echoed: JSONValue = [
                "method": .string(entry.method), "path": .string(entry.path), "query": .optional(entry.query),
                "bodyBytes": .int(entry.bodyBytes),
                "headers": .object(headers.sorted { $0.key < $1.key }.map { JSONMember($0.key, .array($0.value.map(JSONValue.string))) }),
            ]
            return JSONResponse.make(.ok, echoed)
        case .close:
            try await context.channel.close()
            throw CancellationError()
        case .answerWhenOpened(let gate, let status, let text):
            await gate.wait()
            return Self.answer(status, [], text)
        case .trickle(let status, let extra):
            var response = Self.answer(status, extra, "")
            let released = self.released
            response.body = ResponseBody { writer in
                while !released.isOpen {
                    try await writer.write(ByteBuffer(string: " "))
                    try await Task.sleep(for: .milliseconds(100))
                }
                try await writer.finish(nil)
            }
            return response
        case .stall:
            // A server does not notice the client hanging up while it reads nothing: wait for the test.
            await released.wait()
            throw CancellationError()
        }
    }
}

/// Runs `services` (applications) in one group for the duration of `body`, then stops them.
func withServices<T: Sendable>(_ services: [any Service], _ body: @Sendable () async throws -> T) async throws -> T {
    let group = ServiceGroup(services: services, logger: quietLogger)
    return try await withThrowingTaskGroup(of: T?.self) { tasks in
        tasks.addTask {
            try await group.run()
            return nil
        }
        do {
            let result = try await body()
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
            return result
        } catch {
            await group.triggerGracefulShutdown()
            try? await tasks.waitForAll()
            throw error
        }
    }
}

/// The bound port reported through an `onListening` hook.
final class BoundPort: Sendable {
    private let log = ObservedLog<Int>()

    var hook: @Sendable (SocketAddress?) async -> Void { { address in await self.log.append(address?.port ?? 0) } }

    func wait() async throws -> Int {
        guard let port = await log.first(timeout: .seconds(10) * Sanitizer.slowdown, where: { _ in true }) else { throw TimedOut(what: "a listener") }
        return port
    }
}

/// Serves `kora` on 127.0.0.1 port 0, or on `unixSocket`; passes the base URL (`.../api/v1/idv`).
func withScriptedKora<T: Sendable>(
    _ kora: ScriptedKora, unixSocket: String? = nil, _ body: @Sendable (String) async throws -> T
) async throws -> T {
    let bound = BoundPort()
    let app = scriptedKoraApp(kora, unixSocket: unixSocket, bound: bound)
    return try await withServices([app]) {
        let port = try await bound.wait()
        let base = unixSocket.map { "http+unix://\(percentEncoded($0))/api/v1/idv" } ?? "http://127.0.0.1:\(port)/api/v1/idv"
        return try await body(base)
    }
}

func scriptedKoraApp(_ kora: ScriptedKora, unixSocket: String?, bound: BoundPort) -> some ApplicationProtocol {
    let router = Router(context: SidecarRequestContext.self)
    for method in [HTTPRequest.Method.get, .head, .post, .put, .patch, .delete] {
        router.on("**", method: method) { request, context in try await kora.respond(request, context: context) }
    }
    return Application(
        router: router,
        configuration: .init(address: unixSocket.map { .unixDomainSocket(path: $0) } ?? .hostname("127.0.0.1", port: 0)),
        onServerRunning: { channel in await bound.hook(channel.localAddress) }, logger: quietLogger)
}

/// Runs a simulator on 127.0.0.1 port 0; passes it and its base URL (`.../api/v1/idv`).
func withSimulator<T: Sendable>(
    _ configure: (inout SimulatorConfiguration) -> Void = { _ in }, _ body: @Sendable (KoraSimulator, String) async throws -> T
) async throws -> T {
    var configuration = SimulatorConfiguration(webhookSecret: Secret(TestSecrets.webhook))
    configuration.port = 0
    configuration.webhookRetryDelays = []
    configure(&configuration)
    let simulator = KoraSimulator(configuration: configuration)
    let bound = BoundPort()
    let app = buildSimulator(simulator, logger: quietLogger, onListening: bound.hook)
    return try await withServices([app]) {
        let port = try await bound.wait()
        return try await body(simulator, "http://127.0.0.1:\(port)/api/v1/idv")
    }
}

/// A sidecar configuration whose proxy talks to `koraBaseURL` with test credentials.
func proxyConfiguration(koraBaseURL: String, services: [ServiceConfiguration], mode: DeliveryMode = .direct) -> SidecarConfiguration {
    var configuration = testConfiguration(services: services, mode: mode)
    configuration.kora.apiBaseURL = koraBaseURL
    configuration.kora.apiKey = Secret(ProxySecrets.apiKey)
    configuration.kora.tenantId = Secret(ProxySecrets.tenant)
    configuration.kora.callbackURL = "https://hooks.example.com/webhooks/koraidv"
    configuration.kora.retry.maxAttempts = 3
    configuration.kora.retry.initialDelayMilliseconds = 1000
    configuration.kora.retry.maxDelayMilliseconds = 30000
    return configuration
}

/// Options whose proxy records its waits in `sleeper`.
func proxyOptions(_ sleeper: SleepRecorder) -> SidecarOptions {
    var options = SidecarOptions()
    options.koraProxy.sleep = sleeper.sleep
    return options
}

enum ProxySecrets {
    static let apiKey = "sk_sandbox_proxy_test_key_\(TestSecrets.unique)"
    static let tenant = "tenant-0b6e2f6c"
    static let appToken = "app-token-\(TestSecrets.unique)"
}

/// A service that may call the proxy with `ProxySecrets.appToken`.
func appService(name: String = "app", token: String? = ProxySecrets.appToken, allow: [String]? = nil) -> ServiceConfiguration {
    ServiceConfiguration(name: name, token: token.map { Secret($0) }, allow: allow)
}

/// A socket path percent-encoded as the host of an `http+unix://` URL.
func percentEncoded(_ path: String) -> String {
    path.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? path
}

/// A sidecar running for a proxy test: its two listeners' URLs.
struct ProxySidecar: Sendable {
    let webhookPort: Int
    let internalPort: Int

    var webhookURL: String { "http://127.0.0.1:\(webhookPort)/webhooks/koraidv" }
    func internalURL(_ path: String) -> String { "http://127.0.0.1:\(internalPort)\(path)" }
}

/// Runs a sidecar for the duration of `body`; its store is in memory unless `options` or the
/// configuration's `storage.sqlitePath` (with `useSQLite`) says otherwise.
func withProxySidecar(
    _ configuration: SidecarConfiguration, options: SidecarOptions = .init(), logs: TestLogs = TestLogs(), useSQLite: Bool = false,
    _ body: @Sendable (ProxySidecar) async throws -> Void
) async throws {
    var options = options
    if options.store == nil, !useSQLite { options.store = InMemoryStore() }
    let ports = ObservedLog<(ListenerRole, Int)>()
    options.onListening = { role, address in await ports.append((role, address?.port ?? 0)) }
    let app = try buildApplication(configuration, logger: logs.logger(), options: options)
    try await withServices([app]) {
        guard await ports.wait(timeout: .seconds(10) * Sanitizer.slowdown, until: { $0.count == 2 }) else { throw TimedOut(what: "the sidecar's listeners") }
        let bound = await ports.all
        try await body(
            ProxySidecar(
                webhookPort: bound.first { $0.0 == .webhooks }?.1 ?? 0, internalPort: bound.first { $0.0 == .internal }?.1 ?? 0))
    }
}

/// The value of a metric on the internal listener, named with its labels as `/metrics` writes them.
func metric(_ name: String, in sidecar: ProxySidecar) async throws -> Double? {
    let text = try await get(sidecar.internalURL("/metrics")).body
    return text.split(separator: "\n").first { $0.hasPrefix(name + " ") }.flatMap { Double($0.split(separator: " ")[1]) }
}
