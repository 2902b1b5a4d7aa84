import KoraSidecarCore
import Logging
import NIOConcurrencyHelpers
import ServiceLifecycle

/// Direct mode's de-duplication ids (SPEC §4.5): an id is remembered once every service took the
/// event, and written to the store just after the 200, off the response path, many ids to one
/// transaction.
///
/// Recently delivered ids are also kept in memory, so a copy that arrives before the write (Kora's
/// second URL) or soon after is a duplicate without asking the store. The store stays the truth
/// (replicas sharing a database see each other's ids there): memory only ever says "seen", never
/// "not seen". A crash between a 200 and its write forgets the ids of that moment; a later copy of
/// one of them is then delivered again, as any retry would be (at least once).
final class DeliveredEvents: Service, Sendable {
    private struct State {
        /// When each id in memory was delivered.
        var seen: [String: UnixTime] = [:]
        /// The ids in memory, oldest first from `oldest`, overwritten in turn.
        var ring: [String] = []
        var oldest = 0
        /// Delivered, not yet written to the store.
        var unwritten: [(eventID: String, at: UnixTime)] = []
        var stopping = false
    }

    private let store: any SidecarStore
    private let capacity: Int
    private let state = NIOLockedValueBox(State())
    private let bell = Doorbell()
    private let logger: Logger

    /// How long the writer lets ids gather before a transaction, so that reads waiting behind a
    /// commit (the store has one writer) wait for few of them.
    static let gathering = Duration.milliseconds(10)
    /// Most ids written in one transaction.
    static let maximumBatch = 1_000

    /// Keeps up to `capacity` ids in memory.
    init(store: any SidecarStore, capacity: Int = 10_000, logger: Logger) {
        self.store = store
        self.capacity = capacity
        self.logger = logger
    }

    /// Whether any of `keys` was delivered at or after `since`: from memory, else from the store.
    func contains(any keys: [String], since: UnixTime) async throws -> Bool {
        let inMemory = state.withLockedValue { state in keys.contains { key in state.seen[key].map { $0 >= since } ?? false } }
        if inMemory { return true }
        return try await store.hasSeen(any: keys, since: since)
    }

    /// Remembers `keys` as delivered at `at`, in memory now and in the store shortly.
    func record(_ keys: [String], at: UnixTime) {
        state.withLockedValue { state in
            for key in keys {
                if state.ring.count < capacity {
                    state.ring.append(key)
                } else {
                    state.seen[state.ring[state.oldest]] = nil
                    state.ring[state.oldest] = key
                    state.oldest = (state.oldest + 1) % capacity
                }
                state.seen[key] = at
                state.unwritten.append((key, at))
            }
        }
        bell.ring()
    }

    /// Writes recorded ids to the store until shutdown, then writes the rest.
    package func run() async throws {
        await withGracefulShutdownHandler {
            while true {
                let generation = bell.generation
                let (batch, stopping) = state.withLockedValue { state in
                    let batch = Array(state.unwritten.prefix(Self.maximumBatch))
                    state.unwritten.removeFirst(batch.count)
                    return (batch, state.stopping)
                }
                if !batch.isEmpty {
                    await write(batch)
                    continue
                }
                if stopping || Task.isCancelled { return }
                await bell.wait(after: generation, timeout: .seconds(5))
                try? await Task.sleep(for: Self.gathering)
            }
        } onGracefulShutdown: {
            self.state.withLockedValue { $0.stopping = true }
            self.bell.ringAll()
        }
    }

    /// Writes `batch` in one store call, one transaction.
    private func write(_ batch: [(eventID: String, at: UnixTime)]) async {
        do {
            try await store.remember(batch)
        } catch {
            logger.error(
                "Delivered but not remembered; a copy arriving later will be delivered again",
                metadata: [
                    "webhook.count": "\(batch.count)", "webhook.ids": "\(batch.prefix(10).map(\.eventID).joined(separator: ","))",
                    "error": "\(error)",
                ])
        }
    }
}
