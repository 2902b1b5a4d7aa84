import NIOConcurrencyHelpers
import Foundation
import Hummingbird
import Logging
import NIOCore
import ServiceLifecycle

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

/// One request a receiver got.
struct ReceivedDelivery: Sendable {
    let path: String
    let headers: [String: String]
    let body: [UInt8]

    func header(_ name: String) -> String? { headers[name.lowercased()] }
    var json: JSONValue? { try? JSONParser.parse(body) }
}

/// A service that receives deliveries: a real Hummingbird listener on 127.0.0.1 port 0 or on a Unix socket.
final class Receiver: Sendable {
    private let received = NIOLockedValueBox<[ReceivedDelivery]>([])
    private let counted = NIOLockedValueBox(0)
    private let recording: Bool
    private let answer: @Sendable (ReceivedDelivery, Int) async -> HTTPResponse.Status

    /// `answer` decides the status from the request and how many requests came before it (from 0);
    /// without `recording`, requests are only counted (large volumes).
    init(recording: Bool = true, answer: @escaping @Sendable (ReceivedDelivery, Int) async -> HTTPResponse.Status = { _, _ in .ok }) {
        self.recording = recording
        self.answer = answer
    }

    /// A receiver that holds every request until `gate` opens, then answers 200.
    static func held(by gate: Gate) -> Receiver {
        Receiver { _, _ in
            await gate.wait()
            return .ok
        }
    }

    var deliveries: [ReceivedDelivery] { received.withLockedValue { $0 } }
    var count: Int { counted.withLockedValue { $0 } }

    /// Waits until `count` deliveries arrived.
    func waitFor(_ count: Int, timeout: Duration = .seconds(10)) async throws -> [ReceivedDelivery] {
        try await waitUntil("\(count) deliveries", timeout: timeout) { self.count >= count }
        return deliveries
    }

    fileprivate func record(_ request: Request) async throws -> Response {
        let body = try await request.body.collect(upTo: 1 << 24)
        var headers: [String: String] = [:]
        for field in request.headers { headers[field.name.canonicalName] = field.value }
        // HTTPTypes carries Host as the request's authority, not as a header field.
        if let authority = request.head.authority { headers["host"] = authority }
        let delivery = ReceivedDelivery(path: request.uri.path, headers: headers, body: Array(body.readableBytesView))
        if recording { received.withLockedValue { $0.append(delivery) } }
        let index = counted.withLockedValue { count in
            count += 1
            return count - 1
        }
        return Response(status: await answer(delivery, index))
    }
}

/// Runs `receiver` on `address` (TCP port 0 or a Unix socket) for the duration of `body`; passes the bound port.
func withReceiver(
    _ receiver: Receiver, unixSocket: String? = nil, _ body: @Sendable (Int) async throws -> Void
) async throws {
    let router = Router()
    router.post("**") { request, _ in try await receiver.record(request) }
    try await withRouter(router, unixSocket: unixSocket, body)
}

/// Serves `router` on 127.0.0.1 port 0 (or a Unix socket) for the duration of `body`; passes the bound port.
func withRouter(
    _ router: Router<BasicRequestContext>, unixSocket: String? = nil, _ body: @Sendable (Int) async throws -> Void
) async throws {
    let (stream, continuation) = AsyncStream.makeStream(of: Int.self)
    let app = Application(
        router: router,
        configuration: .init(address: unixSocket.map { .unixDomainSocket(path: $0) } ?? .hostname("127.0.0.1", port: 0)),
        onServerRunning: { channel in continuation.yield(channel.localAddress?.port ?? 0) },
        logger: Logger(label: "receiver") { _ in SwiftLogNoOpLogHandler() })
    let group = ServiceGroup(configuration: .init(services: [app], logger: Logger(label: "receiver") { _ in SwiftLogNoOpLogHandler() }))
    try await withThrowingTaskGroup(of: Void.self) { tasks in
        tasks.addTask { try await group.run() }
        var iterator = stream.makeAsyncIterator()
        let port = await iterator.next() ?? 0
        do {
            try await body(port)
            await group.triggerGracefulShutdown()
            tasks.cancelAll()
        } catch {
            await group.triggerGracefulShutdown()
            tasks.cancelAll()
            throw error
        }
    }
}
