import AsyncHTTPClient
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import HTTPTypes
import Hummingbird
import HummingbirdCore
import KoraSidecarCore
import Logging
import NIOConcurrencyHelpers
import NIOCore
import ServiceLifecycle

/// What ``buildApplication(_:logger:options:)`` takes besides the configuration: the seams tests
/// and the demo use. Production passes the defaults.
package struct SidecarOptions: Sendable {
    /// The store to use instead of opening the configured one.
    package var store: (any SidecarStore)?
    /// The wall clock (tests move it to check the timestamp tolerance).
    package var clock: @Sendable () -> UnixTime = UnixTime.now
    /// Called once each listener is bound, with its address.
    package var onListening: @Sendable (ListenerRole, SocketAddress?) async -> Void = { _, _ in }
    /// The retry policy of queued delivery; nil uses `delivery.retrySchedule` with 20% jitter.
    var retryPolicy: RetryPolicy?
    /// Where the metrics are kept and rendered from.
    package var metrics = SidecarMetrics()
    /// The API proxy's seams: how it waits between retries, the callback URL it injects.
    package var koraProxy = KoraProxyOptions()
    /// The first cool-down of a paused service (it doubles up to 20 times this, 10 minutes by default).
    package var breakerCooldown = Duration.seconds(30)

    package init() {}
}

/// Builds the sidecar: the public webhook listener as the application, with the internal listener,
/// the outbox dispatcher, the store and the HTTP client as its services, in dependency order (on
/// SIGTERM the listeners stop first, then the dispatcher drains, then the client and store close).
package func buildApplication(
    _ configuration: SidecarConfiguration, logger: Logger, options: SidecarOptions = .init()
) throws -> some ApplicationProtocol {
    if case .unixSocket(let path) = configuration.internal.listen {
        try UnixSocketFile.replaceIfStale(path, key: "internal.listen.unixSocket")
    }
    if case .unixSocket(let path) = configuration.webhooks.listen {
        try UnixSocketFile.replaceIfStale(path, key: "webhooks.listen.unixSocket")
    }
    if case .unixSocket(let path) = configuration.metrics.listen {
        try UnixSocketFile.replaceIfStale(path, key: "metrics.listen.unixSocket")
    }
    OpenFileLimit.raise(toHold: configuration.listenerConnections, logger: logger)
    try ListenerPreflight.check(configuration.webhooks.listen, key: "webhooks.listen")
    try ListenerPreflight.check(configuration.internal.listen, key: "internal.listen")
    if let listen = configuration.metrics.listen { try ListenerPreflight.check(listen, key: "metrics.listen") }
    let webhookServer = try HTTPServerBuilder.webhookServer(configuration.webhooks.limits, tls: configuration.webhooks.tls, logger: logger)
    let store: any SidecarStore
    var services: [any Service] = []
    if let given = options.store {
        store = given
    } else {
        let opened = try configuration.storage.open(logger: logger)
        store = opened.store
        services.append(opened.service)
    }

    let client = DeliveryClient(
        tls: try configuration.delivery.clientTLS(), caFile: configuration.delivery.caFile, logger: logger.with("component", "delivery"))
    services.append(CloseOnShutdown { client.shutdown() })
    let deliveryServices = configuration.deliveryServices
    for service in deliveryServices where service.signingKeys.isEmpty {
        logger.warning("Deliveries to this service are not signed: set deliver.signingSecret", metadata: ["service": "\(service.name)"])
    }
    for warning in configuration.startupWarnings {
        logger.warning("\(warning)")
    }
    if !configuration.webhooks.enforce {
        logger.warning("webhooks.enforce is false: unverified webhooks are delivered (report-only mode)")
    }
    let sender = EventSender(client: client, reportOnly: !configuration.webhooks.enforce)
    let readiness = Readiness(store: store)
    // What marks the sidecar stopping (below); cancelled with the services, should they be cancelled instead of stopped.
    let stopWatch = NIOLockedValueBox<Task<Void, Never>?>(nil)
    services.append(CloseOnShutdown { stopWatch.withLockedValue { $0 }?.cancel() })

    // Queued mode delivers everything through the dispatcher; direct mode only what an operator
    // queued (re-routed unrouted events, retries).
    let operational = OperationalEvents(store: store, services: deliveryServices, logger: logger.with("component", "dispatcher"))
    let breakers = ServiceBreakers(
        deliveryServices, baseCooldown: options.breakerCooldown, logger: logger.with("component", "breaker"), operational: operational)
    let rateLimits = ServiceRateLimits(deliveryServices)
    let dispatcher = OutboxDispatcher(
        store: store, sender: sender, services: deliveryServices,
        policy: options.retryPolicy ?? RetryPolicy(schedule: configuration.delivery.retrySchedule),
        concurrency: configuration.delivery.concurrency, ordering: configuration.delivery.ordering, breakers: breakers, rateLimits: rateLimits,
        operational: operational, drainTimeout: configuration.delivery.drainTimeout,
        metrics: options.metrics,
        logger: logger.with("component", "dispatcher"))
    services.append(dispatcher)
    operational.wakeUp { [dispatcher] services in dispatcher.notify(services: services) }
    let handoff: any EventHandoff
    switch configuration.delivery.mode {
    case .direct:
        if configuration.storage.postgresURL == nil, deliveryServices.contains(where: \.onlyOwnVerifications) {
            // Direct mode is the choice for a disk the pod loses; this one piece of state must not be lost.
            logger.warning(
                "onlyOwnVerifications keeps which service created each verification in the store: with direct mode on a disk the pod loses, those verifications' later events go to no service after a restart; keep storage.sqlitePath on a volume, or use PostgreSQL",
                metadata: ["path": "\(configuration.storage.sqlitePath)"])
        }
        let delivered = DeliveredEvents(store: store, logger: logger.with("component", "ingress"))
        // Listed before the listeners, so it stops after them and writes the last ids before the store closes.
        services.append(delivered)
        handoff = DirectHandoff(
            store: store, sender: sender, delivered: delivered, breakers: breakers, rateLimits: rateLimits, metrics: options.metrics,
            logger: logger.with("component", "ingress"))
    case .queued:
        handoff = QueuedHandoff(store: store, dispatcher: dispatcher, logger: logger.with("component", "ingress"))
    }
    services.append(
        Housekeeping(
            store: store, retention: .seconds(configuration.webhooks.dedupWindowHours * 3600),
            payloadRetention: configuration.storage.payloadRetention, deadRetention: configuration.storage.deadRetention, logger: logger,
            clock: options.clock))

    let origins = VerificationOrigins(store: store, services: deliveryServices, logger: logger.with("component", "proxy"))
    // Listed before the listeners, so it stops after them and writes the last origins before the store closes.
    services.append(origins)
    let ingress = WebhookIngress(
        configuration: configuration.webhooks, store: store,
        router: EventRouter(services: deliveryServices, store: store, origins: origins), handoff: handoff, clock: options.clock,
        metrics: options.metrics,
        logger: logger.with("component", "ingress"))

    let proxyClient = HTTPClient(
        eventLoopGroupProvider: .singleton, configuration: KoraClient.clientConfiguration(timeoutSeconds: configuration.kora.timeoutSeconds))
    services.append(CloseOnShutdown { try? await proxyClient.shutdown() })
    let proxy = KoraProxy(
        configuration: configuration, client: proxyClient, store: store, origins: origins, options: options.koraProxy, metrics: options.metrics,
        logger: logger.with("component", "proxy"))
    let internalListener = Application(
        router: buildInternalRouter(
            configuration: configuration, store: store, readiness: readiness, metrics: options.metrics, breakers: breakers, proxy: proxy,
            dispatcher: dispatcher),
        server: .sidecarHTTP1(configuration.internal.limits, listener: .internal, logger: logger),
        configuration: .sidecar(configuration.internal.listen, configuration.internal.limits, logger: logger),
        onServerRunning: { channel in
            if case .unixSocket(let path) = configuration.internal.listen { UnixSocketFile.restrict(path) }
            await readiness.listenerBound(.internal)
            logger.info("Listening", metadata: ["listener": "internal", "address": "\(channel.localAddress.map(String.init(describing:)) ?? "-")"])
            await options.onListening(.internal, channel.localAddress)
        },
        logger: logger.with("listener", "internal"))
    services.append(internalListener)
    if let listen = configuration.metrics.listen {
        services.append(
            Application(
                router: buildMetricsRouter(
                    configuration: configuration, store: store, readiness: readiness, metrics: options.metrics, breakers: breakers),
                server: .sidecarHTTP1(configuration.metrics.limits, listener: .metrics, logger: logger),
                configuration: .sidecar(listen, configuration.metrics.limits, logger: logger),
                onServerRunning: { channel in
                    logger.info("Listening", metadata: ["listener": "metrics", "address": "\(channel.localAddress.map(String.init(describing:)) ?? "-")"])
                    await options.onListening(.metrics, channel.localAddress)
                },
                logger: logger.with("listener", "metrics")))
    }

    return Application(
        responder: WebhookResponder(path: configuration.webhooks.path, ingress: ingress),
        server: webhookServer,
        configuration: .sidecar(configuration.webhooks.listen, configuration.webhooks.limits, logger: logger),
        services: services,
        onServerRunning: { channel in
            await readiness.listenerBound(.webhooks)
            // Not ready from the moment a stop begins: this task inherits the listener's graceful
            // shutdown, which comes first, while the internal listener answers until the last.
            stopWatch.withLockedValue {
                $0 = Task {
                    try? await gracefulShutdown()
                    readiness.stop()
                }
            }
            logger.info("Listening", metadata: ["listener": "webhooks", "address": "\(channel.localAddress.map(String.init(describing:)) ?? "-")"])
            await options.onListening(.webhooks, channel.localAddress)
        },
        logger: logger.with("listener", "webhooks"))
}

/// The public listener: `POST {path}` and `GET /healthz`, nothing else (SPEC §4).
struct WebhookResponder: HTTPResponder {
    let path: String
    let ingress: WebhookIngress

    func respond(to request: Request, context: SidecarRequestContext) async throws -> Response {
        switch request.uri.path {
        case path:
            guard request.method == .post else { return refuse(.methodNotAllowed(allow: "POST"), context) }
            return await ingress.handle(request, context: context)
        case "/healthz" where request.method == .get || request.method == .head:
            return JSONResponse.make(.ok, ["status": "ok"])
        case "/healthz":
            return refuse(.methodNotAllowed(allow: "GET"), context)
        default:
            return refuse(.notFound(), context)
        }
    }

    /// Anyone can reach this listener, and the server reads an unanswered request's body to its end
    /// before the next request, however long: a request to the wrong path or with the wrong method
    /// closes its connection instead (Kora never sends one).
    private func refuse(_ error: SidecarHTTPError, _ context: SidecarRequestContext) -> Response {
        var error = error
        error.closeConnection = true
        return error.response(channel: context.channel)
    }
}

extension ApplicationConfiguration {
    /// A listener bound to `address`, capped at `limits.maxConnections` open connections.
    static func sidecar(_ address: ListenAddress, _ limits: ListenerLimits, logger: Logger) -> ApplicationConfiguration {
        let bind: BindAddress =
            switch address {
            case .tcp(let host, let port): .hostname(host, port: port)
            case .unixSocket(let path): .unixDomainSocket(path: path)
            }
        return ApplicationConfiguration(
            address: bind, serverName: nil, availableConnectionsDelegate: .maximum(limits.maxConnections, logger: logger))
    }
}

extension HTTPServerBuilder {
    /// HTTP/1.1 with the listener's header limit, a deadline for the first request head, the idle
    /// time-out, and room made for new connections when the listener is full.
    static func sidecarHTTP1(_ limits: ListenerLimits, listener: ListenerRole, logger: Logger) -> HTTPServerBuilder {
        let connections = ListenerConnections(maxConnections: limits.maxConnections, listener: listener, logger: logger)
        return .http1(
            configuration: .init(
                additionalChannelHandlers: [
                    RequestDeadline(deadline: .seconds(Int64(limits.readTimeoutSeconds))),
                    ExpectContinue(),
                    connections.handler(),
                ],
                idleTimeout: .seconds(Int64(limits.idleTimeoutSeconds)),
                httpDecoderConfiguration: .init(
                    maxHeaderFieldSize: limits.maxHeaderBytes, maxHeaderListSize: limits.maxHeaderBytes, maxHeaderFieldCount: 100)))
    }
}

extension Logger {
    /// A copy with one more metadata value.
    package func with(_ key: String, _ value: String) -> Logger {
        var logger = self
        logger[metadataKey: key] = "\(value)"
        return logger
    }
}
