import Hummingbird
import NIOCore

/// The request context of both listeners: Hummingbird's core storage plus the channel, which the
/// listeners need to cut a connection short (a body too large or too slow is not read to the end).
public struct SidecarRequestContext: RequestContext {
    public var coreContext: CoreRequestContextStorage
    /// The connection the request arrived on.
    public let channel: any Channel

    public init(source: ApplicationRequestContextSource) {
        self.coreContext = .init(source: source)
        self.channel = source.channel
    }

    /// Bodies are read with explicit limits by each route, never by Hummingbird's default.
    public var maxUploadSize: Int { 0 }
}
