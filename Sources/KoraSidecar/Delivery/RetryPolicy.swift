import KoraSidecarCore

/// When a failed delivery is tried again: `retrySchedule` with jitter, `dead` after the last entry,
/// and at once for an answer that says never to retry (410 Gone). A service that answers 429 or 503
/// with `Retry-After` is tried again then, waiting at most the schedule's last step.
struct RetryPolicy: Sendable {
    /// Delay before attempt n+1 after attempt n failed; its length is the number of retries.
    package let schedule: [Duration]
    /// Fraction of each delay added or removed at random (0.2 = ±20%).
    let jitter: Double

    init(schedule: [Duration], jitter: Double = 0.2) {
        self.schedule = schedule
        self.jitter = jitter
    }

    /// What follows attempt `attempt` (from 1) that produced `result` at `now`.
    package func next(after attempt: Int, result: AttemptResult, now: UnixTime) -> NextStep {
        if result.succeeded { return .delivered }
        if result.statusCode == 410 { return .dead }
        guard attempt <= schedule.count else { return .dead }
        if let asked = result.retryAfter, let longest = schedule.last {
            return .retry(at: now.adding(min(asked, longest)))
        }
        let delay = Double(schedule[attempt - 1].milliseconds)
        let jittered = delay * (1 + Double.random(in: -jitter...jitter))
        return .retry(at: UnixTime(milliseconds: now.milliseconds + Int64(jittered.rounded())))
    }
}
