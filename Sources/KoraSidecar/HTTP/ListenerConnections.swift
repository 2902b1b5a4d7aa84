import HummingbirdCore
import Logging
import NIOConcurrencyHelpers
import NIOCore
import Synchronization

/// The open connections of one listener, so that a full listener makes room: when a connection
/// opens and the listener holds `maxConnections`, the connection that has waited longest for a
/// request (kept alive after an answer, or never sent one) is closed, as nginx closes kept-alive
/// connections when it runs out. Without it, anyone who can reach a listener holds all of it with
/// one request per connection per `idleTimeoutSeconds`, and Kora's webhooks (or the probes and
/// services on the internal listener) wait in the kernel's backlog until the idle time-outs.
///
/// A connection in the middle of a request is never closed for room: its head and body have
/// their deadline (``RequestDeadline``), its answer the route's time-outs.
final class ListenerConnections: Sendable {
    /// One connection: since when it waits for a request (0 while a request is being received or
    /// answered), written on its event loop and read by whichever connection needs room.
    fileprivate final class Entry: Sendable {
        let channel: any Channel
        let waitingSince = Atomic<UInt64>(0)

        init(_ channel: any Channel) { self.channel = channel }

        func wait() { waitingSince.store(max(1, NIODeadline.now().uptimeNanoseconds), ordering: .relaxed) }
        func work() { waitingSince.store(0, ordering: .relaxed) }
    }

    private let maxConnections: Int
    private let open = NIOLockedValueBox<[ObjectIdentifier: Entry]>([:])
    private let listener: ListenerRole
    private let logger: Logger
    private let full = LogThrottle(every: .seconds(60))

    init(maxConnections: Int, listener: ListenerRole, logger: Logger) {
        self.maxConnections = maxConnections
        self.listener = listener
        self.logger = logger
    }

    /// The handler each of the listener's connections carries, after HTTP decoding.
    func handler() -> some RemovableChannelHandler { Handler(self) }

    fileprivate func opened(_ entry: Entry) {
        let room: Entry? = open.withLockedValue { open in
            open[ObjectIdentifier(entry.channel)] = entry
            guard open.count >= maxConnections else { return nil }
            return open.values.lazy.filter { $0 !== entry }
                .map { ($0, $0.waitingSince.load(ordering: .relaxed)) }.filter { $0.1 != 0 }
                .min { $0.1 < $1.1 }?.0
        }
        guard let room else { return }
        room.channel.close(promise: nil)
        full.log(["listener": "\(listener.rawValue)", "maxConnections": "\(maxConnections)"]) {
            logger.warning("Listener full: closing the connections that wait longest for a request", metadata: $0)
        }
    }

    fileprivate func closed(_ entry: Entry) {
        open.withLockedValue { open in _ = open.removeValue(forKey: ObjectIdentifier(entry.channel)) }
    }

    /// Marks its connection waiting from when it opens and after each answer, working from each
    /// request head on: requests read and not yet answered are counted, for clients that pipeline.
    private final class Handler: ChannelDuplexHandler, RemovableChannelHandler {
        typealias InboundIn = HTTP1Channel.Value.InboundElement
        typealias InboundOut = InboundIn
        typealias OutboundIn = HTTP1Channel.Value.OutboundElement
        typealias OutboundOut = OutboundIn

        private let connections: ListenerConnections
        private var entry: Entry?
        private var unanswered = 0

        init(_ connections: ListenerConnections) { self.connections = connections }

        func handlerAdded(context: ChannelHandlerContext) {
            let entry = Entry(context.channel)
            entry.wait()
            self.entry = entry
            connections.opened(entry)
        }

        func handlerRemoved(context: ChannelHandlerContext) {
            if let entry { connections.closed(entry) }
            entry = nil
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            if case .head = unwrapInboundIn(data) {
                unanswered += 1
                entry?.work()
            }
            context.fireChannelRead(data)
        }

        func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
            if case .end = unwrapOutboundIn(data), unanswered > 0 {
                unanswered -= 1
                if unanswered == 0 { entry?.wait() }
            }
            context.write(data, promise: promise)
        }
    }
}
