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
    /// The wall clock (tests move it).
    var clock: @Sendable () -> UnixTime = UnixTime.now
    /// The time between passes, when not ``interval``'s (tests).
    var passEvery: Duration?

    /// Every ten minutes, or more often when a retention is shorter (so a body outlives it by at
    /// most half of it, and by 10 s at most with `0s`, which delivery itself mostly applies at once).
    var interval: Duration {
        let shortest = min(payloadRetention, deadRetention)
        return passEvery ?? max(.seconds(10), min(.seconds(600), shortest / 2))
    }

    /// What deletes trusts is the wall clock, which may be wrong at a start (a machine that booted
    /// before its clock was set) or step ahead while running (a virtual machine resumed, a clock
    /// corrected): a week ahead, one pass would delete every dead delivery's body and every id that
    /// tells a duplicate. So the first pass waits one interval, and a pass after which the wall clock
    /// ran ahead of the time that passed deletes nothing: the next one judges the clock again.
    func run() async throws {
        var last = (wall: clock(), clock: ContinuousClock.now)
        while !Task.isShuttingDownGracefully, !Task.isCancelled {
            try? await cancelWhenGracefulShutdown { try await Task.sleep(for: interval) }
            guard !Task.isShuttingDownGracefully, !Task.isCancelled else { return }
            let now = clock()
            let ahead = Duration.milliseconds(now.milliseconds - last.wall.milliseconds) - (ContinuousClock.now - last.clock)
            last = (now, ContinuousClock.now)
            if ahead > Self.clockSlack {
                logger.warning(
                    "The wall clock moved ahead of the time that passed; nothing is deleted until the next pass, which judges it again",
                    metadata: ["clock.ahead_seconds": "\(ahead.components.seconds)"])
                continue
            }
            await pass(at: now)
        }
    }

    /// How far the wall clock may run ahead of the monotonic one between two passes.
    static let clockSlack = Duration.seconds(60)

    /// Deletes what is past its time at `now`.
    private func pass(at now: UnixTime) async {
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
    }

    /// Rows deleted per store call: a large first run never holds the store for long.
    static let batch = 1000

    /// Runs `step` while it says there is more, and until a stop: the services stopping after this
    /// one wait for it.
    private func inBatches(_ step: () async throws -> Bool) async throws {
        while !Task.isCancelled, !Task.isShuttingDownGracefully, try await step() {}
    }
}
