import NIOConcurrencyHelpers

/// Work that runs once at a time: a caller arriving while it runs shares that run's result instead
/// of starting another. Scrapes and probes, which anyone who reaches the listener may send as fast
/// as they like, then put at most one query at a time in front of the store, however slow it is;
/// their callers' deadlines end the wait, not the query, which would otherwise pile up behind it.
final class SingleFlight<Value: Sendable>: Sendable {
    private let running = NIOLockedValueBox<(task: Task<Value, Never>, callers: Int)?>(nil)

    /// The result of the run under way, or of `work` started now if none is.
    func run(_ work: @escaping @Sendable () async -> Value) async -> Value {
        let task = running.withLockedValue { running in
            if let current = running {
                running?.callers += 1
                return current.task
            }
            let task = Task {
                let value = await work()
                self.running.withLockedValue { $0 = nil }
                return value
            }
            running = (task, 1)
            return task
        }
        return await task.value
    }

    /// How many callers wait for the run under way (0 when none is).
    var callers: Int { running.withLockedValue { $0?.callers ?? 0 } }
}
