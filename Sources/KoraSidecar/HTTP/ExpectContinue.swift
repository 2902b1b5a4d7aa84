import HTTPTypes
import HummingbirdCore
import KoraSidecarCore
import NIOCore

/// Answers `Expect: 100-continue` with `100 Continue` as soon as the request head arrives, so that
/// a client (curl, most HTTP libraries) sends a large upload at once instead of waiting a second
/// for an answer that would otherwise never come. A body declared larger than the listener takes
/// gets no `100`: the route answers 413 before reading it.
final class ExpectContinue: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTP1Channel.Value.InboundElement
    typealias InboundOut = InboundIn
    typealias OutboundIn = HTTP1Channel.Value.OutboundElement
    typealias OutboundOut = OutboundIn

    private let maxBodyBytes: Int

    init(maxBodyBytes: Int) { self.maxBodyBytes = maxBodyBytes }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .head(let head) = unwrapInboundIn(data), let expect = head.headerFields[.expect],
            expect.lowercased() == "100-continue",
            head.headerFields[.contentLength].flatMap({ Int($0) }).map({ $0 <= maxBodyBytes }) ?? true
        {
            context.writeAndFlush(wrapOutboundOut(.head(HTTPResponse(status: .continue))), promise: nil)
        }
        context.fireChannelRead(data)
    }
}
