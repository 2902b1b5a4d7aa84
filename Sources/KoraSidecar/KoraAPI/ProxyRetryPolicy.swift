import KoraSidecarCore

/// When the API proxy calls Kora again (SPEC §5.1, KORA.md §4): how many attempts, how long to wait
/// between them, and how to wait. Which answers may be retried is decided by ``KoraProxy``.
struct ProxyRetryPolicy: Sendable {
    /// Attempts in all, the first included (`kora.retry.maxAttempts`).
    package var maxAttempts: Int
    /// The backoff before the second attempt; it doubles for each further one.
    var initialDelay: Duration
    /// The longest wait: a longer backoff is cut to it, a longer `Retry-After` ends the retries.
    var maxDelay: Duration
    /// Picks the actual wait for a backoff delay (default: uniformly in `delay/2 ... delay`).
    var jitter: @Sendable (Duration) -> Duration
    /// Waits between attempts (tests record the delays instead of waiting).
    package var sleep: @Sendable (Duration) async throws -> Void
    /// The wall clock, to turn an HTTP-date `Retry-After` into a delay.
    package var clock: @Sendable () -> UnixTime

    /// The policy of `kora.retry`, with real sleeping and random jitter.
    init(
        _ configuration: RetryConfiguration,
        sleep: (@Sendable (Duration) async throws -> Void)? = nil,
        clock: @escaping @Sendable () -> UnixTime = UnixTime.now
    ) {
        self.maxAttempts = max(1, configuration.maxAttempts)
        self.initialDelay = .milliseconds(max(0, configuration.initialDelayMilliseconds))
        self.maxDelay = .milliseconds(max(0, configuration.maxDelayMilliseconds))
        self.jitter = ProxyRetryPolicy.equalJitter
        self.sleep = sleep ?? { try await Task.sleep(for: $0) }
        self.clock = clock
    }

    /// A delay uniformly in `delay/2 ... delay`: spreads callers out, never waits longer than planned.
    static let equalJitter: @Sendable (Duration) -> Duration = { delay in
        let milliseconds = delay.milliseconds
        guard milliseconds > 1 else { return delay }
        return .milliseconds(Int64.random(in: (milliseconds / 2)...milliseconds))
    }

    /// The exponential backoff after failed attempt `attempt` (from 1), capped and jittered.
    func backoff(after attempt: Int) -> Duration {
        let shift = min(max(attempt - 1, 0), 30)
        let planned = min(initialDelay.milliseconds.multipliedReportingOverflow(by: 1 << shift).partialValue, maxDelay.milliseconds)
        return jitter(.milliseconds(max(0, planned)))
    }

    /// How long to wait before the attempt after `attempt`: `retryAfter` when Kora gave one, else
    /// the backoff. Nil when Kora asks for a wait longer than `maxDelay` (the answer is then passed
    /// back at once: waiting less would only earn another 429).
    package func delay(after attempt: Int, retryAfter: String?) -> Duration? {
        guard let retryAfter, let asked = RetryAfter.parse(retryAfter, now: clock()) else { return backoff(after: attempt) }
        return asked <= maxDelay ? asked : nil
    }
}
