import KoraSidecarCore
import NIOConcurrencyHelpers

/// Wakes a waiting worker when there is new work, so that a queued event is delivered at once
/// instead of at the next poll, without waking every idle worker for one event.
final class Doorbell: Sendable {
    private struct State {
        var generation = 0
        var waiters: [Int: CheckedContinuation<Void, Never>] = [:]
        var nextWaiter = 0
    }

    private let state = NIOLockedValueBox(State())

    /// Wakes one waiter (one new piece of work needs one worker); with none waiting, the next
    /// worker to wait finds the generation changed and does not sleep.
    func ring() {
        let waiter = state.withLockedValue { state -> CheckedContinuation<Void, Never>? in
            state.generation += 1
            guard let id = state.waiters.keys.first else { return nil }
            return state.waiters.removeValue(forKey: id)
        }
        waiter?.resume()
    }

    /// Wakes every waiter (shutdown).
    func ringAll() {
        let waiters = state.withLockedValue { state in
            state.generation += 1
            defer { state.waiters = [:] }
            return Array(state.waiters.values)
        }
        waiters.forEach { $0.resume() }
    }

    /// The current generation; pass it to ``wait(after:timeout:)`` so that a ring between reading
    /// it and waiting is not missed.
    var generation: Int { state.withLockedValue { $0.generation } }

    /// Returns when the bell rings after `generation`, when `timeout` passes, or on cancellation.
    func wait(after generation: Int, timeout: Duration) async {
        await withTaskGroup(of: Void.self) { group in
            group.addTask { try? await Task.sleep(for: timeout) }
            group.addTask { await self.waitForRing(after: generation) }
            await group.next()
            group.cancelAll()
        }
    }

    private func waitForRing(after generation: Int) async {
        let id = state.withLockedValue { state in
            state.nextWaiter += 1
            return state.nextWaiter
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let resumeNow = state.withLockedValue { state in
                    if state.generation != generation || Task.isCancelled { return true }
                    state.waiters[id] = continuation
                    return false
                }
                if resumeNow { continuation.resume() }
            }
        } onCancel: {
            let continuation = state.withLockedValue { $0.waiters.removeValue(forKey: id) }
            continuation?.resume()
        }
    }
}
