import KoraSidecarCore

/// The Kora key's rate budget, shared by every service calling through the proxy (in this replica):
/// the sidecar never sends a call it knows Kora would refuse.
///
/// The budget is `perMinute` calls in any window of a minute (a sliding log of the calls sent, so
/// no window, however Kora aligns its own, holds more). Without `kora.rateLimit.perMinute` it is
/// learned from Kora's `X-RateLimit-Limit`, and Kora's `X-RateLimit-Remaining` and `-Reset` correct
/// it as answers come in (other clients of the same key spend it too). When the budget is spent a
/// call waits for its turn, up to `maxWait`; waiting calls take turns by their service's `share`
/// (weighted fair queuing), so a service that floods the proxy cannot starve one that calls rarely.
actor KoraBudget {
    /// Why a call was not let through.
    struct Refusal: Error {
        /// When the next call could go.
        var retryAfter: Duration
    }

    private var perWindow: Int?
    /// Whether `perWindow` was configured; else Kora's `X-RateLimit-Limit` sets it, and resets it when the plan changes.
    private let configured: Bool
    private let window: Duration
    private let maxWait: Duration
    /// When each call of the current window was sent, oldest first.
    private var sent: [ContinuousClock.Instant] = []
    /// Kora said nothing is left until then.
    private var blockedUntil: ContinuousClock.Instant?
    private var waiting: [Waiter] = []
    /// Each service's virtual finish time: turns already had, divided by its share.
    private var served: [String: Double] = [:]
    private var nextWaiter = 0
    private var pump: Task<Void, Never>?
    private let metrics: SidecarMetrics

    private struct Waiter {
        let id: Int
        let service: String
        let share: Double
        let continuation: CheckedContinuation<Void, any Error>
    }

    /// - Parameters:
    ///   - perMinute: the configured budget; nil learns it from Kora.
    ///   - window: a minute, except in tests.
    init(perMinute: Int?, maxWait: Duration, window: Duration = .seconds(60), metrics: SidecarMetrics) {
        self.perWindow = perMinute
        self.configured = perMinute != nil
        self.maxWait = maxWait
        // A call sent near a window's end may reach Kora in the next one: the window the sidecar
        // counts is a little longer than Kora's (5 %, at least 250 ms).
        self.window = window + max(.milliseconds(250), window / 20)
        self.metrics = metrics
    }

    /// Waits for a turn to call Kora for `service`.
    /// - Throws: ``Refusal`` when no turn came within `maxWait`.
    func acquire(service: String, share: Int) async throws {
        let now = ContinuousClock.now
        forget(before: now)
        let next = nextTurn(at: now)
        if waiting.isEmpty, next == nil {
            take(service: service, share: Double(share), at: now)
            return
        }
        // No turn can come in time: say so now rather than after waiting for nothing.
        if let next, next - now > maxWait {
            metrics.koraCallRefused()
            throw Refusal(retryAfter: next - now)
        }
        let id = nextWaiter
        nextWaiter += 1
        let started = now
        // Turns count only while calls wait: a new wait starts everyone level, and a service that
        // joins one starts level with those waiting, with no credit for the time it sent nothing.
        if waiting.isEmpty { served.removeAll() }
        let floor = waiting.map { served[$0.service] ?? 0 }.min() ?? 0
        served[service] = max(served[service] ?? 0, floor)
        let timeout = Task { [maxWait] in
            try? await Task.sleep(for: maxWait)
            await self.expire(id)
        }
        defer { timeout.cancel() }
        try await withCheckedThrowingContinuation { continuation in
            waiting.append(Waiter(id: id, service: service, share: Double(share), continuation: continuation))
            metrics.koraCallsWaiting(waiting.count)
            schedulePump()
        }
        metrics.koraWaited(milliseconds: Int((ContinuousClock.now - started).milliseconds))
    }

    /// Corrects the budget from one of Kora's answers.
    func observe(limit: String?, remaining: String?, reset: String?) {
        let now = ContinuousClock.now
        if !configured, let limit = limit.flatMap({ Int($0) }), limit > 0 { perWindow = limit }
        // Kora has no call left for this key until its reset, whatever this replica counted (other
        // clients of the key spend it too). A 429 alone is the retry policy's to wait out.
        if remaining.flatMap({ Int($0) }) == 0, let reset = reset.flatMap({ Int64($0) }) {
            blockedUntil = now + .seconds(max(0, reset - UnixTime.now().seconds))
        }
        metrics.koraBudgetRemaining(remainingTurns(at: now))
    }

    // MARK: Turns

    /// Nil when a call may go at `now`, else when the next one may.
    private func nextTurn(at now: ContinuousClock.Instant) -> ContinuousClock.Instant? {
        if let blockedUntil, now < blockedUntil { return blockedUntil }
        guard let perWindow else { return nil }
        guard sent.count >= perWindow else { return nil }
        return sent[sent.count - perWindow] + window
    }

    private func remainingTurns(at now: ContinuousClock.Instant) -> Int {
        if let blockedUntil, now < blockedUntil { return 0 }
        return perWindow.map { max(0, $0 - sent.count) } ?? -1
    }

    private func take(service: String, share: Double, at now: ContinuousClock.Instant) {
        sent.append(now)
        if !waiting.isEmpty || served[service] != nil { served[service, default: 0] += 1 / share }
        metrics.koraBudgetRemaining(remainingTurns(at: now))
    }

    private func forget(before now: ContinuousClock.Instant) {
        while let first = sent.first, first + window <= now { sent.removeFirst() }
        if let blockedUntil, blockedUntil <= now { self.blockedUntil = nil }
    }

    /// Grants turns to waiting calls as the budget allows, the service furthest behind its share first.
    private func grant() {
        while !waiting.isEmpty {
            let now = ContinuousClock.now
            forget(before: now)
            guard nextTurn(at: now) == nil else { return schedulePump() }
            let index = waiting.indices.min { served[waiting[$0].service] ?? 0 < served[waiting[$1].service] ?? 0 }!
            let waiter = waiting.remove(at: index)
            take(service: waiter.service, share: waiter.share, at: now)
            metrics.koraCallsWaiting(waiting.count)
            waiter.continuation.resume()
        }
    }

    private func schedulePump() {
        guard pump == nil else { return }
        let wake = nextTurn(at: .now) ?? .now
        pump = Task {
            try? await Task.sleep(until: wake, clock: .continuous)
            await self.pumped()
        }
    }

    private func pumped() {
        pump = nil
        grant()
    }

    private func expire(_ id: Int) {
        guard let index = waiting.firstIndex(where: { $0.id == id }) else { return }
        let waiter = waiting.remove(at: index)
        metrics.koraCallsWaiting(waiting.count)
        metrics.koraCallRefused()
        let now = ContinuousClock.now
        let retryAfter = (nextTurn(at: now) ?? now) - now
        waiter.continuation.resume(throwing: Refusal(retryAfter: retryAfter))
    }
}
