import HummingbirdCore
import Logging
import NIOConcurrencyHelpers
import NIOCore
import Synchronization

/// The open connections of one listener, so that a full listener makes room: whenever it holds
/// `maxConnections` (a connection opens, or one finishes a request), the connection that has waited
/// longest for a request (kept alive after an answer, or silent since it opened), for at least
/// ``grace``, is closed, as nginx closes kept-alive connections when it runs out. Without it, anyone
/// who can reach a listener holds all of it with one request per connection per
/// `idleTimeoutSeconds`, and Kora's webhooks (or the probes and services on the internal listener)
/// wait in the kernel's backlog until the idle time-outs. The listener stops accepting at
/// `maxConnections`, so room is made before a newcomer comes, not when it does.
///
/// A connection whose request head has been read is not closed for room until its answer is written
/// and the grace has passed: its body has its deadline (``RequestDeadline``), its answer the route's
/// time-outs.
final class ListenerConnections: Sendable {
    /// How long a connection waits for a request before it may be closed for room: a client that
    /// just connected, or just had its answer, is about to send; an idle holder has to send a
    /// request this often to keep its connections, which makes holding a listener a flood.
    static let grace = TimeAmount.seconds(1)

    private struct Open {
        var entries: [ObjectIdentifier: Entry] = [:]
        /// Those picked to make room and not yet closed: they count no more.
        var closing: Set<ObjectIdentifier> = []
        /// Whether room is to be made again once the longest waiting has waited ``grace``.
        var recheck = false
        var counted: Int { entries.count - closing.count }
    }

    private let maxConnections: Int
    private let open = NIOLockedValueBox(Open())
    /// `counted`, read without the lock when a request ends.
    private let count = Atomic<Int>(0)
    private let listener: ListenerRole
    private let logger: Logger
    private let closingLog = LogThrottle(every: .seconds(60))
    private let busyLog = LogThrottle(every: .seconds(60))

    init(maxConnections: Int, listener: ListenerRole, logger: Logger) {
        self.maxConnections = maxConnections
        self.listener = listener
        self.logger = logger
    }

    /// The handler each of the listener's connections carries, after HTTP decoding.
    func handler() -> some RemovableChannelHandler { Handler(self) }

    /// Changes the open connections under the lock, and `count` with them.
    private func change<T>(_ body: (inout Open) -> T) -> T {
        open.withLockedValue { open in
            defer { count.store(open.counted, ordering: .sequentiallyConsistent) }
            return body(&open)
        }
    }

    private func opened(_ entry: Entry) {
        change { $0.entries[ObjectIdentifier(entry.channel)] = entry }
        makeRoom(on: entry.channel.eventLoop)
    }

    private func closed(_ entry: Entry) {
        let id = ObjectIdentifier(entry.channel)
        change { open in
            open.entries[id] = nil
            open.closing.remove(id)
        }
    }

    /// A connection finished its requests and waits for the next: with the listener full, some
    /// connection makes room (this one, when every other is busy).
    private func waiting(on loop: any EventLoop) {
        if count.load(ordering: .sequentiallyConsistent) >= maxConnections { makeRoom(on: loop) }
    }

    /// When the listener is full, closes the connections that have waited longest for a request,
    /// those that have waited ``grace``, as many as take it back under `maxConnections` (one read of
    /// the listening socket may accept several); looks again once the next of them has waited that
    /// long. They are picked under the lock (no other opening picks them too, and they count no
    /// more), then closed on their own event loops, where one that had a request meanwhile is kept
    /// and another one picked.
    private func makeRoom(on loop: any EventLoop) {
        let (picked, lookAgain, allBusy): ([(entry: Entry, since: UInt64)], TimeAmount?, Bool) = change { open in
            let excess = open.counted - maxConnections + 1
            // A look already planned comes no later than any connection here reaches the grace.
            guard excess > 0, !open.recheck else { return ([], nil, false) }
            var waiting: [(entry: Entry, since: UInt64)] = []
            for (id, entry) in open.entries where !open.closing.contains(id) {
                let since = entry.waitingSince.load(ordering: .sequentiallyConsistent)
                if since != 0 { waiting.append((entry, since)) }
            }
            waiting.sort { $0.since < $1.since }
            let now = NIODeadline.now().uptimeNanoseconds
            let grace = UInt64(Self.grace.nanoseconds)
            let picked = Array(waiting.prefix { now - min(now, $0.since) >= grace }.prefix(excess))
            for (entry, _) in picked { open.closing.insert(ObjectIdentifier(entry.channel)) }
            guard picked.count < excess, waiting.count > picked.count else { return (picked, nil, waiting.isEmpty) }
            open.recheck = true
            // Not yet past the grace: later than now.
            return (picked, .nanoseconds(Int64(waiting[picked.count].since + grace - now)), false)
        }
        if allBusy {
            busyLog.log(["listener": "\(listener.rawValue)", "maxConnections": "\(maxConnections)"]) {
                logger.warning("Listener full: every connection is in the middle of a request", metadata: $0)
            }
        }
        if let lookAgain {
            loop.scheduleTask(in: lookAgain) {
                self.open.withLockedValue { $0.recheck = false }
                self.makeRoom(on: loop)
            }.futureResult.whenFailure { _ in self.open.withLockedValue { $0.recheck = false } }
        }
        for (entry, since) in picked {
            // On its loop, where its handler writes `waitingSince`: the same value means it has had
            // no request since it was picked.
            entry.channel.eventLoop.execute {
                guard entry.waitingSince.load(ordering: .sequentiallyConsistent) == since else {
                    self.change { _ = $0.closing.remove(ObjectIdentifier(entry.channel)) }
                    return self.makeRoom(on: entry.channel.eventLoop)
                }
                self.closingLog.log(["listener": "\(self.listener.rawValue)", "maxConnections": "\(self.maxConnections)"]) {
                    self.logger.warning("Listener full: closing the connection that waits longest for a request", metadata: $0)
                }
                entry.channel.close(promise: nil)
            }
        }
    }

    /// One connection, as the others see it.
    fileprivate final class Entry: Sendable {
        let channel: any Channel
        /// Since when it waits for a request (``NIODeadline`` nanoseconds), 0 while it works on one;
        /// written on the connection's event loop only.
        let waitingSince = Atomic<UInt64>(0)

        init(_ channel: any Channel) { self.channel = channel }
    }

    /// Counts its connection's requests: read and not yet answered (clients may pipeline). It
    /// waits from when it opens, and again once the answer to its last request is written.
    fileprivate final class Handler: ChannelDuplexHandler, RemovableChannelHandler {
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
            self.entry = entry
            entry.waitingSince.store(Self.now(), ordering: .sequentiallyConsistent)
            connections.opened(entry)
        }

        func handlerRemoved(context: ChannelHandlerContext) {
            if let entry { connections.closed(entry) }
            entry = nil
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            if case .head = unwrapInboundIn(data) {
                unanswered += 1
                entry?.waitingSince.store(0, ordering: .sequentiallyConsistent)
            }
            context.fireChannelRead(data)
        }

        func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
            context.write(data, promise: promise)
            guard case .end = unwrapOutboundIn(data), unanswered > 0 else { return }
            unanswered -= 1
            // The last answer is written: waiting from now. Its bytes may still be on their way to
            // the client; the grace covers that, and one that takes longer is a client not reading.
            guard unanswered == 0, let entry else { return }
            entry.waitingSince.store(Self.now(), ordering: .sequentiallyConsistent)
            connections.waiting(on: context.eventLoop)
        }

        private static func now() -> UInt64 { max(1, NIODeadline.now().uptimeNanoseconds) }
    }
}
