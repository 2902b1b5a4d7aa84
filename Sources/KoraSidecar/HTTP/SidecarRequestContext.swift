import Hummingbird
import KoraSidecarCore
import NIOCore

/// The request context of both listeners: Hummingbird's core storage plus the channel, which the
/// listeners need to cut a connection short (a body too large or too slow is not read to the end).
package struct SidecarRequestContext: RequestContext {
    package var coreContext: CoreRequestContextStorage
    /// The connection the request arrived on.
    package let channel: any Channel

    package init(source: ApplicationRequestContextSource) {
        self.coreContext = .init(source: source)
        self.channel = source.channel
    }

    /// Bodies are read with explicit limits by each route, never by Hummingbird's default.
    package var maxUploadSize: Int { 0 }
}
