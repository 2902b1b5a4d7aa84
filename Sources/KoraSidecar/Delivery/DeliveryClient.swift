import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL

/// Delivery's HTTP/1.1 client, on NIO's codec: a pool of kept-alive connections per service over
/// TCP (TLS for `https`) or a Unix socket, a connect time-out and the service's time-out for the
/// whole exchange, at most 64 KiB of an answer read, and no redirect ever followed (a 3xx is an
/// answer like any other). AsyncHTTPClient did the same for about twice the CPU per delivery, most
/// of it in machinery delivery does not use (per-request URL parsing, a state machine per request
/// for streaming, redirects, HTTP/2); the Kora API proxy still uses it.
package final class DeliveryClient: Sendable {
    /// Most of an answer that is read; the rest ends the connection.
    static let maximumAnswerBytes = 64 * 1024
    static let connectTimeout = TimeAmount.seconds(5)
    /// How long a kept-alive connection waits for its next delivery: under the 60 to 75 s after
    /// which common servers (nginx, Node) close an idle connection themselves.
    static let idleTimeout = TimeAmount.seconds(55)
    /// Most idle connections kept per service; more close once their delivery is done.
    static let maximumIdlePerEndpoint = 64

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

    /// `tls` verifies `https` services' certificates (the system's trust roots by default).
    package init(tls: TLSConfiguration = .makeClientConfiguration(), group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) {
        self.tls = tls
        self.group = group
    }

    /// POSTs `body` with `headers` to `endpoint` and returns the answer, or throws why there is none
    /// within `timeout`.
    ///
    /// A kept-alive connection the service closed before a byte of the answer came back is retried
    /// once on a new connection: the service closes idle connections when it likes, and this is how
    /// that race shows. Sending again is safe: at worst the service gets the event twice, with the
    /// same `webhook-id` for it to drop the second, which Standard Webhooks asks receivers to do and
    /// which any retry of at-least-once delivery already implies.
    func post(_ headers: HTTPHeaders, body: [UInt8], to endpoint: DeliveryEndpoint, timeout: Duration) async throws -> DeliveryAnswer {
        let deadline = NIODeadline.now() + TimeAmount(timeout)
        var request = HTTPRequestHead(version: .http1_1, method: .POST, uri: endpoint.target, headers: headers)
        request.headers.replaceOrAdd(name: "Host", value: endpoint.hostHeader)
        request.headers.add(name: "Content-Length", value: String(body.count))
        let buffer = ByteBuffer(bytes: body)
        if let kept = try takeIdle(endpoint) {
            do {
                return try await exchange(request, buffer, on: kept, endpoint: endpoint, deadline: deadline)
            } catch DeliveryClientError.closedBeforeAnswer {
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
            guard !pool.shutDown, pool.idle[endpoint, default: []].count < Self.maximumIdlePerEndpoint else { return false }
            pool.idle[endpoint, default: []].append(connection)
            return true
        }
        if !kept { connection.channel.close(promise: nil) }
    }

    private func connect(_ endpoint: DeliveryEndpoint, deadline: NIODeadline) async throws -> DeliveryConnection {
        let context = try endpoint.tlsServerName.map { _ in try sslContext() }
        let bootstrap = ClientBootstrap(group: group).connectTimeout(min(Self.connectTimeout, deadline - .now()))
        let initializer: @Sendable (any Channel) -> EventLoopFuture<DeliveryConnection> = { channel in
            channel.eventLoop.makeCompletedFuture {
                if let context, let name = endpoint.tlsServerName {
                    // SNI carries host names only; an IP address is verified against the certificate's addresses.
                    let isAddress = (try? SocketAddress(ipAddress: name, port: 0)) != nil
                    try channel.pipeline.syncOperations.addHandler(NIOSSLClientHandler(context: context, serverHostname: isAddress ? nil : name))
                }
                try channel.pipeline.syncOperations.addHTTPClientHandlers()
                let handler = DeliveryExchangeHandler(maximumAnswerBytes: Self.maximumAnswerBytes, idleTimeout: Self.idleTimeout)
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
        try tlsContext.withLockedValue { context in
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

    /// Runs one exchange; a cancelled task closes the connection and ends it at once.
    func exchange(_ request: HTTPRequestHead, _ body: ByteBuffer, deadline: NIODeadline) async throws -> DeliveryExchangeHandler.Outcome {
        let promise = channel.eventLoop.makePromise(of: DeliveryExchangeHandler.Outcome.self)
        try Task.checkCancellation()
        let handler = handler
        return try await withTaskCancellationHandler {
            channel.eventLoop.execute { handler.value.start(request, body: body, deadline: deadline, promise: promise) }
            return try await promise.futureResult.get()
        } onCancel: {
            channel.eventLoop.execute { handler.value.abandon() }
        }
    }
}
