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
    /// The service's time-out passed before the head of its answer arrived.
    case timedOut
    /// The connection was closed before the whole request was written: the service cannot have
    /// taken it, so it may be sent again at once.
    case closedBeforeSending
    /// The connection closed (or was reset) after the request was sent, before the answer's head.
    case closedBeforeAnswer
    /// The answer was not HTTP/1.1.
    case malformedAnswer
    /// The request cannot be written as HTTP/1.1: a configured header value holds a line break or
    /// another character HTTP forbids, so it is never sent (it could smuggle a second request).
    case invalidRequest
    /// The sidecar is stopping.
    case shutDown

    var description: String {
        switch self {
        case .timedOut: "timed out"
        case .closedBeforeSending: "connection closed by the other side before the request was sent"
        case .closedBeforeAnswer: "connection closed by the other side"
        case .malformedAnswer: "the answer was not HTTP/1.1"
        case .invalidRequest: "the request is not valid HTTP: check the service's headers and path"
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
    /// Whether the exchange under way has handed its whole request to the kernel.
    private var sent = false
    /// Whether any byte of the exchange's answer arrived (the decoder has seen its start).
    private var head: HTTPResponseHead?
    private var answerBytes = 0
    private var idleClose: Scheduled<Void>?
    /// An exchange whose task was cancelled before it started: it never will.
    private var abandoned: EventLoopFuture<Outcome>?
    /// The last exchange started (nil: the connection is new): tells a cancellation that came too
    /// late from one that came early, and a write that finished from an earlier exchange's.
    private var lastStarted: EventLoopFuture<Outcome>?
    /// Why a new connection failed before its first exchange started (a TLS handshake refused).
    private var earlyFailure: (any Error)?

    init(maximumAnswerBytes: Int, idleTimeout: TimeAmount) {
        self.maximumAnswerBytes = maximumAnswerBytes
        self.idleTimeout = idleTimeout
    }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }
    func handlerRemoved(context: ChannelHandlerContext) { self.context = nil }

    /// Sends `request` with `body`; `promise` gets the answer, or fails at `deadline`.
    func start(_ request: HTTPRequestHead, body: ByteBuffer, deadline: NIODeadline, promise: EventLoopPromise<Outcome>) {
        guard abandoned !== promise.futureResult else {
            promise.fail(CancellationError())
            return
        }
        guard let context, context.channel.isActive, pending == nil else {
            // Nothing was written. A kept-alive connection found closed is the service's idle close.
            promise.fail((lastStarted == nil ? earlyFailure : nil) ?? DeliveryClientError.closedBeforeSending)
            return
        }
        idleClose?.cancel()
        idleClose = nil
        sent = false
        head = nil
        answerBytes = 0
        let exchange = promise.futureResult
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        let timeout = context.eventLoop.scheduleTask(deadline: deadline) { handler.value.timedOut() }
        pending = (promise, timeout)
        lastStarted = promise.futureResult
        let written = context.eventLoop.makePromise(of: Void.self)
        // Only this exchange's write says it went out (an early answer can end one mid-write).
        written.futureResult.whenSuccess { if handler.value.lastStarted === exchange { handler.value.sent = true } }
        context.write(wrapOutboundOut(.head(request)), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: written)
    }

    /// The task of the exchange answering `promise` was cancelled: that exchange ends, or never
    /// starts, and the connection closes with it. Once that exchange is over (its connection may
    /// already carry another's), nothing happens.
    func abandon(_ promise: EventLoopPromise<Outcome>) {
        if let pending, pending.promise.futureResult === promise.futureResult {
            end(answered ? .success(false) : .failure(CancellationError()))
        } else if lastStarted !== promise.futureResult {
            abandoned = promise.futureResult
            context?.close(promise: nil)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard pending != nil else {
            // An answer nobody asked for, or the rest of one too long to read: the connection is done.
            context.close(promise: nil)
            return
        }
        switch unwrapInboundIn(data) {
        case .head(let head) where head.status.code < 200:
            // Only 101 gets here (NIO drops the other 1xx): the connection would stop being HTTP.
            self.head = head
            end(.failure(DeliveryClientError.malformedAnswer))
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
        end(answered ? .success(false) : .failure(closed))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // After the answer's head, whatever happens to its body (TLS closed without its notice, a
        // reset, a body that breaks off), the status is all an attempt needs: the service said it.
        if answered {
            end(.success(false))
            context.close(promise: nil)
            return
        }
        let failure: any Error =
            switch error {
            // A reset, an end of stream mid-answer, or TLS closed without its notice: the service
            // closed the connection.
            case is IOError, HTTPParserError.invalidEOFState, NIOSSLError.uncleanShutdown: closed
            // NIO's check of the request on its way out, before a byte of it is written.
            case is HTTPParserError where !sent && head == nil: DeliveryClientError.invalidRequest
            case is HTTPParserError: DeliveryClientError.malformedAnswer
            default: error
            }
        if pending == nil, lastStarted == nil { earlyFailure = earlyFailure ?? failure }
        end(.failure(failure))
        context.close(promise: nil)
    }

    /// Whether the final answer's head arrived: from then on the answer counts by its status, however
    /// its body ends (cut off, broken, too slow, the task cancelled). Counting it as failed would
    /// send the service again an event it said it took.
    private var answered: Bool { (head?.status.code ?? 0) >= 200 }

    /// How the exchange under way ends when the connection closes before its answer's head.
    private var closed: DeliveryClientError { sent ? .closedBeforeAnswer : .closedBeforeSending }

    /// The time-out passed: an answer whose head arrived counts, and ends its connection; without
    /// one, the attempt timed out.
    private func timedOut() {
        end(answered ? .success(false) : .failure(DeliveryClientError.timedOut))
    }

    /// Completes the exchange under way: with the answer (and whether the connection stays), or
    /// with why there is none, which closes the connection.
    private func end(_ result: Result<Bool, any Error>) {
        guard let (promise, timeout) = pending, let context else { return }
        pending = nil
        timeout.cancel()
        switch result {
        case .success(let keepAlive):
            guard let head else {
                context.close(promise: nil)
                promise.fail(DeliveryClientError.malformedAnswer)
                return
            }
            let answer = DeliveryAnswer(status: Int(head.status.code), retryAfter: head.headers.first(name: "retry-after"))
            if keepAlive {
                let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
                idleClose = context.eventLoop.scheduleTask(in: idleTimeout) { handler.value.closeIfIdle() }
            } else {
                context.close(promise: nil)
            }
            promise.succeed(Outcome(answer: answer, reusable: keepAlive))
        case .failure(let error):
            context.close(promise: nil)
            promise.fail(error)
        }
    }

    private func closeIfIdle() {
        if pending == nil { context?.close(promise: nil) }
    }
}
