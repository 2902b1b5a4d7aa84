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
                var expired = 0
                try await inBatches {
                    let batch = try await store.expireBodies(
                        deliveredBefore: now.adding(.zero - payloadRetention), deadBefore: now.adding(.zero - deadRetention), limit: Self.batch)
                    expired += batch
                    return batch == Self.batch
                }
                if expired > 0 { logger.info("Deleted bodies past their retention", metadata: ["expired.bodies": "\(expired)"]) }
                var pruned = PruneResult(deliveries: 0, seenIDs: 0)
                try await inBatches {
                    let batch = try await store.prune(deliveredBefore: cutoff, seenBefore: cutoff, limit: Self.batch)
                    pruned.deliveries += batch.deliveries
                    pruned.seenIDs += batch.seenIDs
                    return batch.more
                }
                try await inBatches {
                    try await store.pruneIdempotencyKeys(before: now.adding(.zero - KoraProxy.idempotencyRetention), limit: Self.batch) == Self.batch
                }
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

    /// Rows deleted per store call: a large first run never holds the store for long.
    static let batch = 1000

    /// Runs `step` while it says there is more, and until a stop: the services stopping after this
    /// one wait for it.
    private func inBatches(_ step: () async throws -> Bool) async throws {
        while !Task.isCancelled, !Task.isShuttingDownGracefully, try await step() {}
    }
}
