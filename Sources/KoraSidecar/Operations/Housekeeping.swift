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

    /// Every ten minutes, or more often when a retention is shorter (so a body outlives it by at most half of it).
    var interval: Duration {
        let shortest = [payloadRetention, deadRetention].filter { $0 > .zero }.min() ?? .seconds(600)
        return max(.seconds(1), min(.seconds(600), shortest / 2))
    }

    func run() async throws {
        while !Task.isShuttingDownGracefully, !Task.isCancelled {
            let now = UnixTime.now()
            let cutoff = now.adding(.zero - retention)
            do {
                let expired = try await store.expireBodies(
                    deliveredBefore: now.adding(.zero - payloadRetention), deadBefore: now.adding(.zero - deadRetention))
                if expired > 0 { logger.info("Deleted bodies past their retention", metadata: ["expired.bodies": "\(expired)"]) }
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
