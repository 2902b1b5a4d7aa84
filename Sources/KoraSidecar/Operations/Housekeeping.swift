import KoraSidecarCore
import Logging
import ServiceLifecycle

/// Prunes the store in the background: delivered deliveries and de-duplication ids older than the
/// de-duplication window, and `Idempotency-Key` records older than a day, so the database never
/// grows without bound.
struct Housekeeping: Service {
    let store: any SidecarStore
    let retention: Duration
    let logger: Logger
    var interval: Duration = .seconds(600)

    func run() async throws {
        while !Task.isShuttingDownGracefully, !Task.isCancelled {
            let cutoff = UnixTime.now().adding(.zero - retention)
            do {
                let pruned = try await store.prune(deliveredBefore: cutoff, seenBefore: cutoff)
                _ = try await store.pruneIdempotencyKeys(before: UnixTime.now().adding(.zero - KoraProxy.idempotencyRetention))
                if pruned.deliveries + pruned.seenIDs > 0 {
                    logger.info(
                        "Pruned the store",
                        metadata: ["pruned.deliveries": "\(pruned.deliveries)", "pruned.seen_ids": "\(pruned.seenIDs)"])
                }
            } catch {
                logger.error("Pruning failed", metadata: ["error": "\(error)"])
            }
            try? await cancelWhenGracefulShutdown { try await Task.sleep(for: interval) }
        }
    }
}
