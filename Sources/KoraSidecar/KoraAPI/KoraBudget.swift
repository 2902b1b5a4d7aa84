import NIOCore
import KoraSidecarCore
import ServiceLifecycle

/// The Kora key's rate budget, shared by every service calling through the proxy: the sidecar
/// never sends a call it knows Kora would refuse.
///
/// The budget is `perMinute` calls in any window of a minute (a sliding log of the calls sent, so
/// no window, however Kora aligns its own, holds more). Without `kora.rateLimit.perMinute` it is
/// learned from Kora's `X-RateLimit-Limit`, and Kora's `X-RateLimit-Remaining: 0` with `-Reset`
/// holds every call until the reset (other clients of the same key spend it too). The turns are
/// counted by a ``BudgetLedger``: in this process, or in the PostgreSQL database that replicas share,
/// so that two replicas do not each spend the whole budget. When the budget is spent a call waits for
/// its turn, up to `maxWait`; waiting calls take turns by their service's `share` (weighted fair
/// queuing). And each service that called within the window has a turn or more held for it
/// (``Reservations``): one that floods the proxy cannot spend, before the others call again, every
/// turn they would have had, nor leave more than those few unused.
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
    private let ledger: any BudgetLedger
    private var waiting: [Waiter] = []
    /// Each service's virtual finish time while calls wait: turns had, divided by its share.
    private var served: [String: Double] = [:]
    private var nextWaiter = 0
    private var pump: Task<Void, Never>?
    /// When `pump` runs.
    private var pumpAt: UnixTime?
    private var granting = false
    private var reservations: Reservations
    /// When the next turn could come, as the ledger last said: the `Retry-After` of a call refused after waiting.
    private var nextTurn: UnixTime?
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
    ///   - ledger: where turns are counted (the shared database with PostgreSQL replicas).
    init(perMinute: Int?, maxWait: Duration, window: Duration = .seconds(60), ledger: any BudgetLedger = LocalBudgetLedger(), metrics: SidecarMetrics) {
        self.perWindow = perMinute
        self.configured = perMinute != nil
        self.maxWait = maxWait
        // A call sent near a window's end may reach Kora in the next one: the window the sidecar
        // counts is a little longer than Kora's (5 %, at least 250 ms).
        self.window = window + max(.milliseconds(250), window / 20)
        self.reservations = Reservations(window: self.window)
        self.ledger = ledger
        self.metrics = metrics
    }

    /// Waits for a turn to call Kora for `service`.
    /// - Throws: ``Refusal`` when no turn came within `maxWait`.
    func acquire(service: String, share: Int) async throws {
        let now = UnixTime.now()
        reservations.called(service, share: Double(share), at: now)
        if waiting.isEmpty {
            let turn = try await take(for: service, at: now)
            guard let next = turn.nextTurn else { return }
            nextTurn = next
            // No turn can come in time: say so now rather than after waiting for nothing.
            let wait = Duration.milliseconds(next.milliseconds - UnixTime.now().milliseconds)
            if wait > maxWait {
                metrics.koraCallRefused()
                throw Refusal(retryAfter: wait)
            }
        }
        let id = nextWaiter
        nextWaiter += 1
        let started = ContinuousClock.now
        // Turns count only while calls wait: a new wait starts everyone level, and a service that
        // joins one starts level with those waiting, with no credit for the time it sent nothing.
        if waiting.isEmpty { served.removeAll() }
        let floor = waiting.map { served[$0.service] ?? 0 }.min() ?? 0
        served[service] = max(served[service] ?? 0, floor)
        let timeout = Task { [maxWait] in
            guard (try? await Task.sleep(for: maxWait)) != nil else { return }
            self.timedOut(id)
        }
        defer { timeout.cancel() }
        // A stop, or a caller that went away, ends the wait at once: the call would otherwise wait
        // out `maxWait` (up to five minutes, past any grace period) and take a turn nobody uses.
        try await cancelWhenGracefulShutdown { try await self.wait(id, service: service, share: Double(share)) }
        metrics.koraWaited(milliseconds: Int((ContinuousClock.now - started).milliseconds))
    }

    /// Joins the calls waiting for a turn until ``grant()`` gives one or ``remove(_:throwing:)`` ends the wait.
    private func wait(_ id: Int, service: String, share: Double) async throws {
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                guard !Task.isCancelled else { return continuation.resume(throwing: CancellationError()) }
                waiting.append(Waiter(id: id, service: service, share: share, continuation: continuation))
                metrics.koraCallsWaiting(waiting.count)
                schedulePump(at: .now())
            }
        } onCancel: {
            Task { await self.remove(id, throwing: CancellationError()) }
        }
    }

    /// Corrects the budget from one of Kora's answers.
    func observe(limit: String?, remaining: String?, reset: String?) async {
        // Kora's own figure, within what a plan can be: an absurd one would overflow the shares.
        if !configured, let limit = limit.flatMap({ Int($0) }), limit > 0 { perWindow = min(limit, KoraRateLimit.perMinuteRange.upperBound) }
        // Kora has no call left for this key until its reset, whatever was counted (other clients
        // of the key spend it too). A 429 alone is the retry policy's to wait out.
        if remaining.flatMap({ Int($0) }) == 0, let reset = reset.flatMap({ Int64($0) }) {
            let latest = UnixTime.now().adding(Self.longestHold).seconds
            try? await ledger.hold(until: UnixTime(milliseconds: max(0, min(reset, latest)) * 1000))
        }
    }

    /// The longest Kora's reset may hold every call. Kora's windows are a minute: a reset further
    /// away is a misread header (milliseconds for seconds, say) or a clock that differs from Kora's,
    /// and two minutes outlast any window of Kora's, while a longer hold would stop every service's
    /// calls for as long as the header said (an hour, it was).
    static let longestHold = Duration.seconds(120)

    // MARK: Turns

    /// Takes a turn for `service` from the ledger, leaving the turns held for the other services.
    private func take(for service: String, at now: UnixTime) async throws -> BudgetTurn {
        let held = reservations.held(from: service, of: perWindow, at: now)
        var turn = try await ledger.take(perWindow: perWindow.map { $0 - held }, window: window, at: now)
        if turn.remaining >= 0 { turn.remaining += held }
        metrics.koraBudgetRemaining(turn.remaining)
        if turn.nextTurn == nil { reservations.took(service, at: now) }
        return turn
    }

    /// Grants turns to waiting calls as the ledger allows: each waiting service in turn, the one
    /// furthest behind its share first, until one gets a turn; none does until the next turn comes.
    private func grant() async {
        guard !granting else { return }
        granting = true
        defer { granting = false }
        while !waiting.isEmpty {
            let now = UnixTime.now()
            var services: [String] = []
            for waiter in waiting.sorted(by: { served[$0.service] ?? 0 < served[$1.service] ?? 0 }) where !services.contains(waiter.service) {
                services.append(waiter.service)
            }
            var granted = false
            var next: UnixTime?
            for service in services {
                let turn: BudgetTurn
                do {
                    turn = try await take(for: service, at: now)
                } catch {
                    return schedulePump(at: UnixTime.now().adding(.seconds(1)))
                }
                if let later = turn.nextTurn {
                    next = min(next ?? later, later)
                    continue
                }
                // Its first waiter; or, should it have left while the ledger answered, whoever is furthest behind.
                let index = waiting.firstIndex { $0.service == service }
                    ?? waiting.indices.min { served[waiting[$0].service] ?? 0 < served[waiting[$1].service] ?? 0 }
                guard let index else { return }
                let waiter = waiting.remove(at: index)
                served[waiter.service, default: 0] += 1 / waiter.share
                metrics.koraCallsWaiting(waiting.count)
                waiter.continuation.resume()
                granted = true
                break
            }
            if !granted {
                nextTurn = next
                return schedulePump(at: next ?? now.adding(.seconds(1)))
            }
        }
    }

    /// Wakes ``grant()`` at `wake`, or sooner if it was to wake later: a call that joins the wait may
    /// get a turn the ones waiting could not (the turns held for its service).
    private func schedulePump(at wake: UnixTime) {
        if pump != nil, let pumpAt, pumpAt <= wake { return }
        pump?.cancel()
        pumpAt = wake
        let delay = Duration.milliseconds(max(0, wake.milliseconds - UnixTime.now().milliseconds))
        pump = Task {
            guard (try? await Task.sleep(for: delay)) != nil else { return }
            await self.pumped()
        }
    }

    private func pumped() async {
        pump = nil
        pumpAt = nil
        await grant()
    }

    /// Ends a call's wait when its `maxWait` passed: refused, told when the next turn should come.
    private func timedOut(_ id: Int) {
        let wait = nextTurn.map { Duration.milliseconds($0.milliseconds - UnixTime.now().milliseconds) } ?? .seconds(1)
        remove(id, throwing: Refusal(retryAfter: max(.seconds(1), wait)))
    }

    /// Ends a call's wait: its `maxWait` passed (a ``Refusal``), or its caller went away.
    private func remove(_ id: Int, throwing error: any Error) {
        guard let index = waiting.firstIndex(where: { $0.id == id }) else { return }
        let waiter = waiting.remove(at: index)
        metrics.koraCallsWaiting(waiting.count)
        if error is Refusal { metrics.koraCallRefused() }
        waiter.continuation.resume(throwing: error)
    }
}

/// The turns held for the services that called within the window, so that one that spends the budget
/// first cannot leave another none when it calls again: each is held one turn more than it had, up to
/// its share of the window (`perWindow` × its share ÷ the shares of those that called, at least one).
/// A service calling alone holds nothing back, and a light one holds back little. Counted by this
/// process (each replica keeps its own), from the calls it saw and the turns it gave them.
struct Reservations {
    let window: Duration
    /// The services that called within the window: their share and their calls, oldest first.
    private var calls: [String: (share: Double, at: CircularBuffer<UnixTime>)] = [:]
    /// The turns each service had within the window, oldest first.
    private var turns: [String: CircularBuffer<UnixTime>] = [:]

    init(window: Duration) { self.window = window }

    mutating func called(_ service: String, share: Double, at now: UnixTime) {
        forget(before: now)
        calls[service, default: (share, [])].share = share
        calls[service]?.at.append(now)
    }

    mutating func took(_ service: String, at now: UnixTime) {
        turns[service, default: []].append(now)
    }

    /// How many of `perWindow` turns are held for services other than `service` (none when the
    /// limit is unknown; never all, so that it can always get one in time).
    mutating func held(from service: String, of perWindow: Int?, at now: UnixTime) -> Int {
        guard let perWindow else { return 0 }
        forget(before: now)
        let shares = calls.values.reduce(0) { $0 + $1.share }
        var held = 0
        for (other, caller) in calls where other != service {
            let share = max(1, Int((Double(perWindow) * caller.share / shares).rounded(.down)))
            let had = turns[other]?.count ?? 0
            held += max(0, min(share, caller.at.count + 1) - had)
        }
        return min(held, perWindow - 1)
    }

    /// Drops the calls and turns the window has passed (each call's cost is what it drops).
    private mutating func forget(before now: UnixTime) {
        for service in Array(calls.keys) {
            while let first = calls[service]?.at.first, first.adding(window) <= now { calls[service]?.at.removeFirst() }
            if calls[service]?.at.isEmpty == true { calls[service] = nil }
        }
        for service in Array(turns.keys) {
            while let first = turns[service]?.first, first.adding(window) <= now { turns[service]?.removeFirst() }
            if turns[service]?.isEmpty == true { turns[service] = nil }
        }
    }
}

/// What taking a turn found.
struct BudgetTurn: Sendable {
    /// Nil when the turn was taken; else when the next may come.
    var nextTurn: UnixTime?
    /// Turns left in the window after this one (-1 while no limit is known).
    var remaining: Int
}

/// Where the Kora budget's turns are counted.
protocol BudgetLedger: Sendable {
    /// Takes a turn at `now` when Kora's hold has passed and fewer than `perWindow` turns were
    /// taken in the last `window` (any number when `perWindow` is unknown).
    func take(perWindow: Int?, window: Duration, at now: UnixTime) async throws -> BudgetTurn
    /// Kora said none remain until `until`.
    func hold(until: UnixTime) async throws
}

/// The turns of this process (one sidecar, or a SQLite store that no other process shares).
actor LocalBudgetLedger: BudgetLedger {
    /// Oldest first; a ring, as the oldest leave one by one (up to 100 000 a minute: an array shifted
    /// all the others at each call).
    private var sent = CircularBuffer<UnixTime>()
    /// Kora's hold: until when, and when it was set.
    private var koraHold: (until: UnixTime, setAt: UnixTime)?

    init() {}

    func take(perWindow: Int?, window: Duration, at now: UnixTime) -> BudgetTurn {
        // Turns stamped after `now` were taken before the wall clock stepped back: they count as
        // taken now (still a window's worth in Kora's real minute), not for as long as the step; a
        // hold set then lasts what it had left, not that plus the step.
        if let last = sent.last, last > now { sent = CircularBuffer(sent.lazy.map { min($0, now) }) }
        if let held = koraHold, now < held.setAt { koraHold = (now.adding(.milliseconds(held.until.milliseconds - held.setAt.milliseconds)), now) }
        while let first = sent.first, first.adding(window) <= now { sent.removeFirst() }
        // The later of Kora's hold and the window's next free turn: a caller told the hold's end would
        // wait, or come back, for nothing.
        let slot = perWindow.flatMap { sent.count >= $0 ? sent[sent.index(sent.endIndex, offsetBy: -$0)].adding(window) : nil }
        if let koraHold, now < koraHold.until { return BudgetTurn(nextTurn: max(koraHold.until, slot ?? koraHold.until), remaining: 0) }
        guard let perWindow else { return BudgetTurn(nextTurn: nil, remaining: -1) }
        if let slot { return BudgetTurn(nextTurn: slot, remaining: 0) }
        sent.append(now)
        return BudgetTurn(nextTurn: nil, remaining: perWindow - sent.count)
    }

    func hold(until: UnixTime) {
        koraHold = (max(koraHold?.until ?? until, until), .now())
    }
}
