import KoraSidecarCore
import ServiceLifecycle

/// A service that waits for graceful shutdown, then runs `close` (the HTTP client, the store).
package struct CloseOnShutdown: Service {
    let close: @Sendable () async -> Void

    package init(close: @escaping @Sendable () async -> Void) { self.close = close }

    package func run() async throws {
        try? await gracefulShutdown()
        await close()
    }
}
