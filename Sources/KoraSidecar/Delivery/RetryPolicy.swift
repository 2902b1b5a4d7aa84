import KoraSidecarCore

/// When a failed delivery is tried again: `retrySchedule` with jitter, `dead` after the last entry,
/// and at once for an answer that says never to retry (410 Gone). A service that answers 429 or 503
/// with `Retry-After` is not tried again before it asked, waiting at most the schedule's last step;
/// a shorter `Retry-After` does not bring the attempt forward, since every attempt counts against
/// the schedule (`Retry-After: 1` to each would spend its day of retries in minutes).
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
        let delay = Double(schedule[attempt - 1].milliseconds)
        let jittered = Int64((delay * (1 + Double.random(in: -jitter...jitter))).rounded())
        if let asked = result.retryAfter, let longest = schedule.last {
            return .retry(at: UnixTime(milliseconds: now.milliseconds + max(min(asked, longest).milliseconds, jittered)))
        }
        return .retry(at: UnixTime(milliseconds: now.milliseconds + jittered))
    }
}
