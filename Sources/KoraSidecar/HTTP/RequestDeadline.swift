import HummingbirdCore
import KoraSidecarCore
import NIOCore

/// Closes a connection whose request does not arrive in time: the first request head within the
/// deadline of the connection opening, and every request body within the deadline of its head. It
/// also closes one whose client stops reading: once answers wait unwritten (the channel is not
/// writable), the client has the same deadline to take some; the idle time-out does not run while a
/// response is being written, so a client that pipelines requests and never reads would hold the
/// connection for good.
///
/// Clients sending headers a byte at a time (slowloris) or a body that never ends cannot hold
/// connections: the idle time-out alone never fires while bytes keep trickling in. The timer is
/// armed only when a read ends with a request still incomplete, so a request that arrives whole
/// (the usual case) costs no timer, and the routes read bodies without one.
///
/// It sits after HTTP decoding and removes nothing from the pipeline; the next head on a kept-alive
/// connection falls under the idle time-out.
final class RequestDeadline: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTP1Channel.Value.InboundElement
    typealias InboundOut = InboundIn

    private let deadline: TimeAmount
    private var timer: Scheduled<Void>?
    /// Armed while the channel is not writable.
    private var writeTimer: Scheduled<Void>?
    /// Whether a request head arrived and its end has not.
    private var inBody = false

    init(deadline: TimeAmount) { self.deadline = deadline }

    func handlerAdded(context: ChannelHandlerContext) {
        arm(context)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        disarm()
        writeTimer?.cancel()
        writeTimer = nil
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            writeTimer?.cancel()
            writeTimer = nil
        } else if writeTimer == nil {
            writeTimer = closing(context)
        }
        context.fireChannelWritabilityChanged()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head:
            disarm()
            inBody = true
        case .end:
            disarm()
            inBody = false
        case .body:
            break
        }
        context.fireChannelRead(data)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if inBody, timer == nil { arm(context) }
        context.fireChannelReadComplete()
    }

    private func arm(_ context: ChannelHandlerContext) {
        timer = closing(context)
    }

    /// Closes the connection once the deadline passes, unless cancelled.
    private func closing(_ context: ChannelHandlerContext) -> Scheduled<Void> {
        let channel = context.channel
        return context.eventLoop.scheduleTask(in: deadline) { channel.close(promise: nil) }
    }

    private func disarm() {
        timer?.cancel()
        timer = nil
    }
}

extension NIOAsyncChannel {
    /// What the channel reads: for ``HTTP1Channel`` the decoded request parts, which Hummingbird
    /// does not export by name.
    typealias InboundElement = Inbound
    /// What the channel writes: for ``HTTP1Channel`` the response parts.
    typealias OutboundElement = Outbound
}
