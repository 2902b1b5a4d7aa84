import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL

/// A service at the connection level, for what delivery's client must get right: a real NIO
/// listener on 127.0.0.1 port 0 (TLS when given a configuration) that counts the connections it
/// accepts and closes, and answers each request as `script` says, from the connection's number and
/// the request's number on that connection (both from 0).
final class ScriptedService: Sendable {
    enum Reply: Sendable {
        /// An HTTP/1.1 answer, kept alive unless `headers` say `Connection: close`.
        case answer(status: Int = 200, headers: [(String, String)] = [])
        /// The connection closes without a byte of an answer, once the request was read.
        case closeWithoutAnswer
        /// The connection closes as soon as the request's head arrived, its body unread.
        case resetOnHead
        /// The answer's head announces a body, then the connection closes.
        case headThenClose
        /// The answer's head announces a body that never comes.
        case headThenStall
        /// No answer at all, the connection held open.
        case stall
        /// A 200, held until this many requests have arrived, over every connection: that many
        /// deliveries are then under way at once, each on a connection of its own.
        case answerOnceReceived(Int)
        /// An HTTP/1.0 200 without a length, its body ending where the connection does; over TLS the
        /// connection closes without TLS's close notice, as many servers close.
        case answerUntilClose
    }

    /// One request read whole: on which connection, its body.
    struct Received: Sendable {
        let connection: Int
        let body: [UInt8]
    }

    let port: Int
    private let channel: any Channel
    private let log = NIOLockedValueBox((connections: 0, closed: 0, requests: [Received](), held: [@Sendable () -> Void]()))

    var connections: Int { log.withLockedValue { $0.connections } }
    var closedConnections: Int { log.withLockedValue { $0.closed } }
    var requests: [Received] { log.withLockedValue { $0.requests } }

    init(tls: TLSConfiguration? = nil, script: @escaping @Sendable (_ connection: Int, _ request: Int) -> Reply) async throws {
        let context = try tls.map { try NIOSSLContext(configuration: $0) }
        let log = log
        channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                let number = log.withLockedValue { log in
                    log.connections += 1
                    return log.connections - 1
                }
                channel.closeFuture.whenComplete { _ in log.withLockedValue { $0.closed += 1 } }
                return channel.eventLoop.makeCompletedFuture {
                    if let context { try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: context)) }
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: false)
                    try channel.pipeline.syncOperations.addHandler(
                        ScriptedConnection(number: number, script: script) { received, held in
                            // Records the request; with a held answer, releases every held one once enough arrived.
                            let release = log.withLockedValue { log -> [@Sendable () -> Void] in
                                log.requests.append(received)
                                guard let (answer, count) = held else { return [] }
                                log.held.append(answer)
                                guard log.requests.count >= count else { return [] }
                                defer { log.held = [] }
                                return log.held
                            }
                            release.forEach { $0() }
                        })
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        port = channel.localAddress?.port ?? 0
    }

    func close() async { try? await channel.close() }
}

/// One connection of a ``ScriptedService``.
private final class ScriptedConnection: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let number: Int
    private let script: @Sendable (Int, Int) -> ScriptedService.Reply
    private let record: @Sendable (ScriptedService.Received, (answer: @Sendable () -> Void, count: Int)?) -> Void
    private var served = 0
    private var reply = ScriptedService.Reply.answer()
    private var body: [UInt8] = []

    init(
        number: Int, script: @escaping @Sendable (Int, Int) -> ScriptedService.Reply,
        record: @escaping @Sendable (ScriptedService.Received, (answer: @Sendable () -> Void, count: Int)?) -> Void
    ) {
        self.number = number
        self.script = script
        self.record = record
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head:
            body = []
            reply = script(number, served)
            served += 1
            // Closing with the body unread makes the kernel reset the connection.
            if case .resetOnHead = reply { context.close(promise: nil) }
        case .body(let part):
            body += part.readableBytesView
        case .end:
            if case .answerOnceReceived(let count) = reply {
                let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
                let eventLoop = context.eventLoop
                let answer: @Sendable () -> Void = { eventLoop.execute { bound.value.0.answer(200, [], bound.value.1) } }
                record(.init(connection: number, body: body), (answer, count))
                return
            }
            record(.init(connection: number, body: body), nil)
            switch reply {
            case .answer(let status, let headers):
                answer(status, headers, context)
            case .closeWithoutAnswer:
                context.close(promise: nil)
            case .headThenClose, .headThenStall:
                let head = HTTPResponseHead(version: .http1_1, status: .ok, headers: ["Content-Length": "100"])
                let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
                let close = if case .headThenClose = reply { true } else { false }
                context.writeAndFlush(wrapOutboundOut(.head(head))).whenComplete { _ in if close { bound.value.close(promise: nil) } }
            case .answerUntilClose:
                let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
                context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_0, status: .ok))), promise: nil)
                context.writeAndFlush(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: "ok"))))).whenComplete { _ in
                    let context = bound.value
                    // Without its TLS handler the close is the socket's alone: no close notice.
                    if let tls = try? context.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self) {
                        context.pipeline.syncOperations.removeHandler(tls, promise: nil)
                    }
                    context.channel.close(promise: nil)
                }
            case .stall, .resetOnHead, .answerOnceReceived:
                break
            }
        }
    }

    private func answer(_ status: Int, _ headers: [(String, String)], _ context: ChannelHandlerContext) {
        var head = HTTPResponseHead(version: .http1_1, status: .init(statusCode: status), headers: HTTPHeaders(headers))
        head.headers.replaceOrAdd(name: "Content-Length", value: "2")
        context.write(wrapOutboundOut(.head(head)), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: "ok")))), promise: nil)
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
    }
}
