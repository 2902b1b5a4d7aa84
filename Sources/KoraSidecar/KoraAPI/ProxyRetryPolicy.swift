#if canImport(Glibc)
import KoraSidecarCore
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

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
        guard let retryAfter, let asked = Self.parseRetryAfter(retryAfter, now: clock()) else { return backoff(after: attempt) }
        return asked <= maxDelay ? asked : nil
    }

    /// Parses `Retry-After`: delay-seconds or an HTTP date (IMF-fixdate, as RFC 9110 requires
    /// senders to use); a date in the past is a wait of zero.
    static func parseRetryAfter(_ value: String, now: UnixTime) -> Duration? {
        let text = String(value.trimmingSpaces)
        if !text.isEmpty, text.utf8.count <= 10, text.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }), let seconds = Int64(text) {
            return .seconds(seconds)
        }
        guard let date = parseHTTPDate(text) else { return nil }
        return .milliseconds(max(0, date.milliseconds - now.milliseconds))
    }

    /// Parses `Sun, 06 Nov 1994 08:49:37 GMT`.
    static func parseHTTPDate(_ text: String) -> UnixTime? {
        let parts = text.split(separator: " ")
        guard parts.count == 6, parts[5] == "GMT", let day = Int32(parts[1]),
            let month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"].firstIndex(of: String(parts[2])),
            let year = Int32(parts[3])
        else { return nil }
        let clock = parts[4].split(separator: ":")
        guard clock.count == 3, let hour = Int32(clock[0]), let minute = Int32(clock[1]), let second = Int32(clock[2]),
            (1...31).contains(day), (0...23).contains(hour), (0...59).contains(minute), (0...60).contains(second)
        else { return nil }
        var fields = tm()
        fields.tm_year = year - 1900
        fields.tm_mon = Int32(month)
        fields.tm_mday = day
        fields.tm_hour = hour
        fields.tm_min = minute
        fields.tm_sec = second
        let seconds = timegm(&fields)
        guard seconds >= 0 else { return nil }
        return UnixTime(milliseconds: Int64(seconds) * 1000)
    }
}
