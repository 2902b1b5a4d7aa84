import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL

/// Delivery's HTTP/1.1 client, on NIO's codec: a pool of kept-alive connections per service over
/// TCP (TLS for `https`) or a Unix socket, a connect time-out and the service's time-out for the
/// whole exchange, at most 64 KiB of an answer read, and no redirect ever followed (a 3xx is an
/// answer like any other). AsyncHTTPClient did the same for about a third more CPU per delivery,
/// spent on what delivery does not use (per-request URL parsing, streaming state machines,
/// redirects, HTTP/2); the Kora API proxy still uses it.
///
/// Connections to a service are as many as the deliveries to it under way, which
/// `delivery.concurrency` bounds (and, in `direct` mode, the webhook listener's connections).
package final class DeliveryClient: Sendable {
    /// Most of an answer that is read; the rest ends the connection.
    static let maximumAnswerBytes = 64 * 1024
    static let connectTimeout = TimeAmount.seconds(5)
    /// How long a kept-alive connection waits for its next delivery: under nginx's 75 s and Go's
    /// and Hummingbird's unlimited keep-alive; a service that closes sooner (Node, 5 s) closes it
    /// itself, and a connection seen closed is not written to.
    private let idleTimeout: TimeAmount
    /// Most idle connections kept per service; more close once their delivery is done.
    private let maximumIdlePerEndpoint: Int

    private struct Pool {
        var idle: [DeliveryEndpoint: [DeliveryConnection]] = [:]
        var shutDown = false
    }

    private let group: any EventLoopGroup
    private let tls: TLSConfiguration
    private let pool = NIOLockedValueBox(Pool())
    /// Made on the first `https` connection: loading the trust roots costs start-up time and memory
    /// a sidecar delivering over plain HTTP or a Unix socket never needs.
    private let tlsContext = NIOLockedValueBox<NIOSSLContext?>(nil)
    /// With `delivery.caFile`, the context made again when the file changes: a company's authority
    /// added to the bundle is trusted without a restart. Connections kept alive keep the
    /// authorities they were opened with.
    private let renewedContext: RereadFiles<NIOSSLContext>?

    /// `tls` verifies `https` services' certificates (the system's trust roots by default, and the
    /// certificates of `caFile`, read again when it changes: `tls` must hold what it held at start);
    /// the idle time-out (55 s) and the most idle connections per service (64) are parameters for tests.
    package init(
        tls: TLSConfiguration = .makeClientConfiguration(), caFile: String? = nil, idleTimeout: TimeAmount = .seconds(55),
        maximumIdlePerEndpoint: Int = 64, group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        logger: Logger = Logger(label: "kora-sidecar", factory: { _ in SwiftLogNoOpLogHandler() })
    ) {
        self.tls = tls
        self.idleTimeout = idleTimeout
        self.maximumIdlePerEndpoint = maximumIdlePerEndpoint
        self.group = group
        self.renewedContext = caFile.map { caFile in
            RereadFiles(
                paths: [caFile],
                read: {
                    var renewed = tls
                    renewed.additionalTrustRoots = [.certificates(try PEMCertificates.read(caFile, key: "delivery.caFile"))]
                    return try NIOSSLContext(configuration: renewed)
                },
                didRead: { _ in logger.info("delivery.caFile was read again", metadata: [:]) },
                didFail: { error in
                    logger.error(
                        "delivery.caFile changed but cannot be used; the certificate authorities read before are still trusted",
                        metadata: ["error": "\(error)"])
                })
        }
    }

    /// POSTs `body` with `headers` to `endpoint` and returns the answer, or throws why there is none
    /// within `timeout`.
    ///
    /// A kept-alive connection the service closed before the whole request was written to it is
    /// left for a new one, once: the service cannot have taken the request. A connection that
    /// closes after the request went out is an attempt that failed (the service may have acted on
    /// it), which the retry schedule sends again.
    func post(_ headers: HTTPHeaders, body: [UInt8], to endpoint: DeliveryEndpoint, timeout: Duration) async throws -> DeliveryAnswer {
        let deadline = NIODeadline.now() + TimeAmount(timeout)
        var request = HTTPRequestHead(version: .http1_1, method: .POST, uri: endpoint.target, headers: headers)
        // Neither is among `headers`: the configuration refuses both as the sidecar's own.
        request.headers.add(name: "Host", value: endpoint.hostHeader)
        request.headers.add(name: "Content-Length", value: String(body.count))
        let buffer = ByteBuffer(bytes: body)
        if let kept = try takeIdle(endpoint) {
            do {
                return try await exchange(request, buffer, on: kept, endpoint: endpoint, deadline: deadline)
            } catch DeliveryClientError.closedBeforeSending where !Task.isCancelled {
                // The service closed it first: once more on a new connection.
            }
        }
        let connection = try await connect(endpoint, deadline: deadline)
        return try await exchange(request, buffer, on: connection, endpoint: endpoint, deadline: deadline)
    }

    /// Closes every idle connection and refuses new deliveries; those under way end on their own.
    package func shutdown() {
        let idle = pool.withLockedValue { pool in
            pool.shutDown = true
            defer { pool.idle = [:] }
            return Array(pool.idle.values.joined())
        }
        for connection in idle { connection.channel.close(promise: nil) }
    }

    private func exchange(
        _ request: HTTPRequestHead, _ body: ByteBuffer, on connection: DeliveryConnection, endpoint: DeliveryEndpoint, deadline: NIODeadline
    ) async throws -> DeliveryAnswer {
        let outcome = try await connection.exchange(request, body, deadline: deadline)
        if outcome.reusable { keep(connection, for: endpoint) }
        return outcome.answer
    }

    private func takeIdle(_ endpoint: DeliveryEndpoint) throws -> DeliveryConnection? {
        try pool.withLockedValue { pool in
            guard !pool.shutDown else { throw DeliveryClientError.shutDown }
            while let connection = pool.idle[endpoint]?.popLast() {
                if connection.channel.isActive { return connection }
            }
            return nil
        }
    }

    private func keep(_ connection: DeliveryConnection, for endpoint: DeliveryEndpoint) {
        let kept = pool.withLockedValue { pool in
            guard !pool.shutDown else { return false }
            // Those the service closed meanwhile go, so that they neither count nor linger.
            pool.idle[endpoint, default: []].removeAll { !$0.channel.isActive }
            guard pool.idle[endpoint, default: []].count < maximumIdlePerEndpoint else { return false }
            pool.idle[endpoint, default: []].append(connection)
            return true
        }
        if !kept { connection.channel.close(promise: nil) }
    }

    private func connect(_ endpoint: DeliveryEndpoint, deadline: NIODeadline) async throws -> DeliveryConnection {
        let remaining = deadline - .now()
        guard remaining > .zero else { throw DeliveryClientError.timedOut }
        let context = endpoint.tls ? try sslContext() : nil
        let bootstrap = ClientBootstrap(group: group).connectTimeout(min(Self.connectTimeout, remaining))
        let idleTimeout = idleTimeout
        let initializer: @Sendable (any Channel) -> EventLoopFuture<DeliveryConnection> = { channel in
            channel.eventLoop.makeCompletedFuture {
                if let context {
                    try channel.pipeline.syncOperations.addHandler(NIOSSLClientHandler(context: context, serverHostname: endpoint.serverName))
                }
                try channel.pipeline.syncOperations.addHTTPClientHandlers()
                let handler = DeliveryExchangeHandler(maximumAnswerBytes: Self.maximumAnswerBytes, idleTimeout: idleTimeout)
                try channel.pipeline.syncOperations.addHandler(handler)
                return DeliveryConnection(channel: channel, handler: NIOLoopBound(handler, eventLoop: channel.eventLoop))
            }
        }
        switch endpoint.address {
        case .tcp(let host, let port): return try await bootstrap.connect(host: host, port: port, channelInitializer: initializer)
        case .unixSocket(let path): return try await bootstrap.connect(unixDomainSocketPath: path, channelInitializer: initializer)
        }
    }

    private func sslContext() throws -> NIOSSLContext {
        if let renewed = renewedContext?.current() { return renewed }
        return try tlsContext.withLockedValue { context in
            if let context { return context }
            let made = try NIOSSLContext(configuration: tls)
            context = made
            return made
        }
    }
}

/// A connection to a service and the handler that runs its exchanges.
struct DeliveryConnection: Sendable {
    let channel: any Channel
    let handler: NIOLoopBound<DeliveryExchangeHandler>

    /// Runs one exchange; a cancelled task ends it, and the connection, at once.
    func exchange(_ request: HTTPRequestHead, _ body: ByteBuffer, deadline: NIODeadline) async throws -> DeliveryExchangeHandler.Outcome {
        let handler = handler
        let promise = channel.eventLoop.makePromise(of: DeliveryExchangeHandler.Outcome.self)
        return try await withTaskCancellationHandler {
            channel.eventLoop.execute { handler.value.start(request, body: body, deadline: deadline, promise: promise) }
            return try await promise.futureResult.get()
        } onCancel: {
            // Runs before `start` when the task was already cancelled: `start` then refuses.
            channel.eventLoop.execute { handler.value.abandon(promise) }
        }
    }
}
