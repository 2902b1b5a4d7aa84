import Logging
import NIOConcurrencyHelpers

/// A log line that anyone, or an outage, can repeat thousands of times a second, let through at
/// most once per interval with the count of those held back (`log.held`). The metrics still count
/// every one; the log only has to say that it happens, without filling the disk or stalling the
/// process on a slow log reader.
package final class LogThrottle: Sendable {
    private let interval: Duration
    private let now: @Sendable () -> ContinuousClock.Instant
    private let state: NIOLockedValueBox<(next: ContinuousClock.Instant, held: Int)>

    init(every interval: Duration, now: @escaping @Sendable () -> ContinuousClock.Instant = { .now }) {
        self.interval = interval
        self.now = now
        self.state = NIOLockedValueBox((now(), 0))
    }

    /// Logs through `emit` with the metadata plus `log.held` when lines were held back, or holds this one back.
    package func log(_ metadata: Logger.Metadata, _ emit: (Logger.Metadata) -> Void) {
        let now = now()
        let held: Int? = state.withLockedValue { state in
            guard now >= state.next else {
                state.held += 1
                return nil
            }
            defer { state = (now + interval, 0) }
            return state.held
        }
        guard let held else { return }
        var metadata = metadata
        if held > 0 { metadata["log.held"] = "\(held)" }
        emit(metadata)
    }
}
