import NIOCore
import NIOHTTP1
import NIOSSL

/// What a service answered to one delivery: all an attempt records of it.
struct DeliveryAnswer: Sendable, Equatable {
    let status: Int
    /// The `Retry-After` header, as sent.
    let retryAfter: String?
}

/// Why a delivery got no answer, in the words an attempt records.
enum DeliveryClientError: Error, Equatable, CustomStringConvertible {
    /// The service's time-out passed before its answer ended.
    case timedOut
    /// The connection closed (or was reset) before a byte of the answer arrived.
    case closedBeforeAnswer
    /// The connection closed in the middle of the answer.
    case closedDuringAnswer
    /// The answer was not HTTP/1.1.
    case malformedAnswer
    /// The sidecar is stopping.
    case shutDown

    var description: String {
        switch self {
        case .timedOut: "timed out"
        case .closedBeforeAnswer: "connection closed by the other side"
        case .closedDuringAnswer: "connection closed during the answer"
        case .malformedAnswer: "the answer was not HTTP/1.1"
        case .shutDown: "the sidecar is stopping"
        }
    }
}

/// One kept-alive HTTP/1.1 connection's exchanges, one at a time: writes a request, reads the
/// answer's head and at most `maximumAnswerBytes` of its body (a longer answer ends the connection,
/// as reading it on would let a service hold the attempt), and closes the connection once it has
/// been idle for `idleTimeout`. Lives on its channel's event loop.
final class DeliveryExchangeHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPClientResponsePart
    typealias OutboundOut = HTTPClientRequestPart

    /// An exchange's end: the answer, and whether the connection can carry the next request.
    struct Outcome {
        let answer: DeliveryAnswer
        let reusable: Bool
    }

    private let maximumAnswerBytes: Int
    private let idleTimeout: TimeAmount
    private var context: ChannelHandlerContext?
    private var pending: (promise: EventLoopPromise<Outcome>, timeout: Scheduled<Void>)?
    private var head: HTTPResponseHead?
    private var answerBytes = 0
    private var idleClose: Scheduled<Void>?
    /// What went wrong while no exchange was under way (a TLS handshake refused before the first
    /// request was handed over): the reason the next one fails.
    private var idleFailure: (any Error)?

    init(maximumAnswerBytes: Int, idleTimeout: TimeAmount) {
        self.maximumAnswerBytes = maximumAnswerBytes
        self.idleTimeout = idleTimeout
    }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }
    func handlerRemoved(context: ChannelHandlerContext) { self.context = nil }

    /// Sends `request` with `body`; `promise` gets the answer, or fails at `deadline`.
    func start(_ request: HTTPRequestHead, body: ByteBuffer, deadline: NIODeadline, promise: EventLoopPromise<Outcome>) {
        guard let context, context.channel.isActive, pending == nil else {
            promise.fail(idleFailure ?? DeliveryClientError.closedBeforeAnswer)
            return
        }
        idleClose?.cancel()
        idleClose = nil
        head = nil
        answerBytes = 0
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        let timeout = context.eventLoop.scheduleTask(deadline: deadline) { handler.value.end(.failure(DeliveryClientError.timedOut)) }
        pending = (promise, timeout)
        context.write(wrapOutboundOut(.head(request)), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
    }

    /// Ends the exchange under way, if one is (a task was cancelled): the connection closes.
    func abandon() {
        end(.failure(CancellationError()))
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard pending != nil else {
            // An answer nobody asked for, or the rest of one too long to read: the connection is done.
            context.close(promise: nil)
            return
        }
        switch unwrapInboundIn(data) {
        case .head(let head):
            self.head = head
        case .body(let part):
            answerBytes += part.readableBytes
            if answerBytes > maximumAnswerBytes { end(.success(false)) }
        case .end:
            end(.success(head?.isKeepAlive ?? false))
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        idleClose?.cancel()
        end(.failure(head == nil ? DeliveryClientError.closedBeforeAnswer : DeliveryClientError.closedDuringAnswer))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        let failure: any Error =
            switch error {
            // A reset, an end of stream mid-answer, or TLS closed without its notice: the service
            // closed the connection.
            case is IOError, HTTPParserError.invalidEOFState, NIOSSLError.uncleanShutdown:
                head == nil ? DeliveryClientError.closedBeforeAnswer : DeliveryClientError.closedDuringAnswer
            case is HTTPParserError: DeliveryClientError.malformedAnswer
            default: error
            }
        if pending == nil { idleFailure = idleFailure ?? failure }
        end(.failure(failure))
        context.close(promise: nil)
    }

    /// Completes the exchange under way: with the answer (and whether the connection stays), or
    /// with why there is none, which closes the connection.
    private func end(_ result: Result<Bool, any Error>) {
        guard let (promise, timeout) = pending, let context else { return }
        pending = nil
        timeout.cancel()
        switch result {
        case .success(let keepAlive) where head != nil:
            let head = head!
            let answer = DeliveryAnswer(status: Int(head.status.code), retryAfter: head.headers.first(name: "retry-after"))
            if keepAlive {
                let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
                idleClose = context.eventLoop.scheduleTask(in: idleTimeout) { handler.value.closeIfIdle() }
            } else {
                context.close(promise: nil)
            }
            promise.succeed(Outcome(answer: answer, reusable: keepAlive))
        case .success:
            context.close(promise: nil)
            promise.fail(DeliveryClientError.malformedAnswer)
        case .failure(let error):
            context.close(promise: nil)
            promise.fail(error)
        }
    }

    private func closeIfIdle() {
        if pending == nil { context?.close(promise: nil) }
    }
}
