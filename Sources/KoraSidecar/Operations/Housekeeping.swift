import KoraSidecarCore
import Logging
import ServiceLifecycle

/// Prunes the store in the background: delivered deliveries and de-duplication ids older than the
/// de-duplication window, `Idempotency-Key` records older than a day, and the bodies of events
/// past `storage.payloadRetention` or `storage.deadRetention`, so the database never grows without
/// bound and keeps identity data no longer than needed.
struct Housekeeping: Service {
    let store: any SidecarStore
    let retention: Duration
    let payloadRetention: Duration
    let deadRetention: Duration
    let logger: Logger

    /// Every ten minutes, or more often when a retention is shorter (so a body outlives it by at
    /// most half of it, and by 10 s at most with `0s`, which delivery itself mostly applies at once).
    var interval: Duration {
        let shortest = min(payloadRetention, deadRetention)
        return max(.seconds(10), min(.seconds(600), shortest / 2))
    }

    func run() async throws {
        while !Task.isShuttingDownGracefully, !Task.isCancelled {
            let now = UnixTime.now()
            let cutoff = now.adding(.zero - retention)
            do {
                // A thousand at a time, so that a large first run never holds the store for long.
                var expired = 0
                // A stop ends the batches: the services stopping after this one wait for it.
                while !Task.isCancelled, !Task.isShuttingDownGracefully {
                    let batch = try await store.expireBodies(
                        deliveredBefore: now.adding(.zero - payloadRetention), deadBefore: now.adding(.zero - deadRetention), limit: 1000)
                    expired += batch
                    if batch < 1000 { break }
                }
                if expired > 0 { logger.info("Deleted bodies past their retention", metadata: ["expired.bodies": "\(expired)"]) }
                var pruned = PruneResult(deliveries: 0, seenIDs: 0)
                while !Task.isCancelled, !Task.isShuttingDownGracefully {
                    let batch = try await store.prune(deliveredBefore: cutoff, seenBefore: cutoff, limit: 1000)
                    pruned.deliveries += batch.deliveries
                    pruned.seenIDs += batch.seenIDs
                    if !batch.more { break }
                }
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
