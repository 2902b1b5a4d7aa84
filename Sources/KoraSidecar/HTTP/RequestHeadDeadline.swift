import NIOCore

/// Closes a connection whose first request head has not fully arrived within the deadline, so that
/// clients sending headers a byte at a time (slowloris) cannot hold connections: the idle time-out
/// alone never fires while bytes keep trickling in.
///
/// It sits after HTTP decoding, where the first read is a complete request head, and removes
/// nothing else from the pipeline; later requests on a kept-alive connection fall under the idle
/// time-out and the body read time-out.
final class RequestHeadDeadline: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = NIOAny
    typealias InboundOut = NIOAny

    private let deadline: TimeAmount
    private var timer: Scheduled<Void>?

    init(deadline: TimeAmount) { self.deadline = deadline }

    func handlerAdded(context: ChannelHandlerContext) {
        let channel = context.channel
        timer = context.eventLoop.scheduleTask(in: deadline) { channel.close(promise: nil) }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        timer?.cancel()
        timer = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if let timer {
            timer.cancel()
            self.timer = nil
        }
        context.fireChannelRead(data)
    }
}
