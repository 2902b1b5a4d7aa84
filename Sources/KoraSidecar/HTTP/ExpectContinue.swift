import HTTPTypes
import HummingbirdCore
import KoraSidecarCore
import NIOCore

/// Answers `Expect: 100-continue` with `100 Continue` when the route starts reading the body
/// (``BodyReader`` asks for it with ``ExpectContinue/Requested``), so that a client (curl, most HTTP
/// libraries) sends its upload at once instead of waiting a second for an answer that would
/// otherwise never come. A request refused before its body is read (no signature, a body declared
/// larger than the route takes, a wrong path) gets its refusal without a `100` first, so the client
/// never starts an upload nobody reads; and a `100` is only ever written while the request it
/// belongs to is the one being answered, never inside an earlier answer still being sent. A request
/// answered without its `100` ends its connection with the answer: its body never comes.
final class ExpectContinue: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTP1Channel.Value.InboundElement
    typealias InboundOut = InboundIn
    typealias OutboundIn = HTTP1Channel.Value.OutboundElement
    typealias OutboundOut = OutboundIn

    /// What a route sends down the pipeline when it starts reading a request's body.
    struct Requested {}

    /// For each request received and not yet answered, in order: whether it still waits for its `100`.
    private var owed: [Bool] = []
    /// The answer being written ends the connection: its request's client waits for a `100` that will
    /// not come, with a body it will not send, and the next bytes on the connection would be read as it.
    private var closeAfterAnswer = false

    init() {}

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .head(let head) = unwrapInboundIn(data) {
            owed.append(head.headerFields[.expect]?.lowercased() == "100-continue")
        }
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        switch unwrapOutboundIn(data) {
        // A final answer: what it answers owes no `100` any more, and once it ends the next request is current.
        case .head(var head) where head.status.code >= 200:
            guard owed.first == true else { break }
            owed[0] = false
            closeAfterAnswer = true
            head.headerFields[.connection] = "close"
            return context.write(wrapOutboundOut(.head(head)), promise: promise)
        case .end:
            if !owed.isEmpty { owed.removeFirst() }
            if closeAfterAnswer {
                let written = promise ?? context.eventLoop.makePromise()
                written.futureResult.whenComplete { [channel = context.channel] _ in channel.close(promise: nil) }
                return context.write(data, promise: written)
            }
        default:
            break
        }
        context.write(data, promise: promise)
    }

    func triggerUserOutboundEvent(context: ChannelHandlerContext, event: Any, promise: EventLoopPromise<Void>?) {
        guard event is Requested else { return context.triggerUserOutboundEvent(event, promise: promise) }
        if owed.first == true {
            owed[0] = false
            context.writeAndFlush(wrapOutboundOut(.head(HTTPResponse(status: .continue))), promise: nil)
        }
        promise?.succeed()
    }
}
