import KoraSidecarCore
import Logging
import NIOConcurrencyHelpers

/// One service's circuit breaker, in this replica: closed while the service takes deliveries; open
/// (paused) for a cool-down after `failures` consecutive failed attempts; then half-open, letting one
/// probe through. A success closes it; a failed probe opens it again for twice as long, from the
/// base cool-down (30 s) up to the longest (10 min). While it is open nothing is sent: queued
/// deliveries wait without using up their attempts, and `direct` mode answers 503 at once.
final class ServiceBreaker: Sendable {
    enum State: String, Sendable, CaseIterable {
        case closed
        case open
        case halfOpen = "half_open"
    }

    /// What an attempt may do now.
    enum Permit: Equatable {
        case go
        /// Wait until then (the end of the cool-down, or the probe's outcome).
        case wait(until: UnixTime)
    }

    /// The breaker as `/admin/services` shows it.
    struct Snapshot: Sendable {
        var state: State
        var consecutiveFailures: Int
        var openUntil: UnixTime?
        var cooldown: Duration
    }

    private struct Status {
        var state = State.closed
        var consecutiveFailures = 0
        var openUntil: UnixTime?
        var cooldown: Duration
        var probing = false
    }

    let service: String
    private let failures: Int
    private let baseCooldown: Duration
    private let longestCooldown: Duration
    private let status: NIOLockedValueBox<Status>
    private let logger: Logger
    /// Told when the breaker opens (true) or closes (false), with its state then.
    private let onChange: (@Sendable (_ paused: Bool, Snapshot) -> Void)?

    init(
        service: String, failures: Int, baseCooldown: Duration = .seconds(30), longestCooldown: Duration = .seconds(600), logger: Logger,
        onChange: (@Sendable (_ paused: Bool, Snapshot) -> Void)? = nil
    ) {
        self.onChange = onChange
        self.service = service
        self.failures = failures
        self.baseCooldown = baseCooldown
        self.longestCooldown = max(longestCooldown, baseCooldown)
        self.status = NIOLockedValueBox(Status(cooldown: baseCooldown))
        self.logger = logger
    }

    var snapshot: Snapshot {
        status.withLockedValue { Snapshot(state: $0.state, consecutiveFailures: $0.consecutiveFailures, openUntil: $0.openUntil, cooldown: $0.cooldown) }
    }

    /// Whether an attempt may go at `now`. Past the cool-down the first caller becomes the probe;
    /// a caller that got `.go` as the probe but has nothing to send calls ``withdrawProbe()``.
    func permit(now: UnixTime) -> Permit {
        let (permit, changed) = status.withLockedValue { status -> (Permit, Bool) in
            switch status.state {
            case .closed:
                return (.go, false)
            case .open:
                // Never longer than the cool-down from now: after the wall clock stepped back an
                // hour, `until` would otherwise pause the service for that hour too.
                if let until = status.openUntil, now < until, until.milliseconds - now.milliseconds <= status.cooldown.milliseconds {
                    return (.wait(until: until), false)
                }
                status.state = .halfOpen
                status.probing = true
                return (.go, true)
            case .halfOpen:
                guard !status.probing else { return (.wait(until: now.adding(.seconds(1))), false) }
                status.probing = true
                return (.go, false)
            }
        }
        if changed { logger.notice("Service probing after its pause", metadata: ["service": "\(service)"]) }
        return permit
    }

    /// Whether attempts go freely now (closed): a worker leases its next delivery only then.
    var isClosed: Bool { status.withLockedValue { $0.state == .closed } }

    /// The probe found nothing to send: the next caller may probe.
    func withdrawProbe() { status.withLockedValue { $0.probing = false } }

    /// Records whether an attempt found the service healthy (see ``AttemptResult/serviceFailed``) at `now`.
    func record(healthy: Bool, now: UnixTime) {
        let change = status.withLockedValue { status -> (State, Duration)? in
            status.probing = false
            if healthy {
                status.consecutiveFailures = 0
                guard status.state != .closed else { return nil }
                status.state = .closed
                status.openUntil = nil
                status.cooldown = baseCooldown
                return (.closed, .zero)
            }
            status.consecutiveFailures += 1
            switch status.state {
            case .halfOpen:
                status.cooldown = min(status.cooldown * 2, longestCooldown)
            case .closed where status.consecutiveFailures >= failures:
                status.cooldown = baseCooldown
            default:
                return nil
            }
            status.state = .open
            status.openUntil = now.adding(status.cooldown)
            return (.open, status.cooldown)
        }
        switch change {
        case (.closed, _)?:
            logger.notice("Service resumed", metadata: ["service": "\(service)"])
            onChange?(false, snapshot)
        case (.open, let cooldown)?:
            logger.warning(
                "Service paused after failed deliveries", metadata: ["service": "\(service)", "breaker.cooldown": "\(DurationText.format(cooldown))"])
            onChange?(true, snapshot)
        default:
            break
        }
    }
}

/// Why a service takes no attempt now: the one check that `queued` workers and `direct` mode make
/// before sending.
enum ServiceHold {
    /// Its breaker is open, or its probe is out, until then.
    case paused(until: UnixTime)
    /// Over `maxPerSecond`: the next token comes after this wait.
    case overRate(wait: Duration)

    /// What holds `service` back at `now`, or nil when an attempt may go (it then took a rate token,
    /// and may be the breaker's probe). The breaker is asked first, so a paused service spends no
    /// token; a probe the rate then holds back is given back, or nobody would ever probe again.
    static func check(_ service: String, breakers: ServiceBreakers, rateLimits: ServiceRateLimits, now: UnixTime) -> ServiceHold? {
        if case .wait(let until)? = breakers[service]?.permit(now: now) { return .paused(until: until) }
        if let wait = rateLimits[service]?.take(now: now), wait > .zero {
            breakers[service]?.withdrawProbe()
            return .overRate(wait: wait)
        }
        return nil
    }

    /// Records what an attempt ``check(_:breakers:rateLimits:now:)`` let go said of `service` at
    /// `now`: nothing, when the sidecar itself could not make it (``AttemptResult/ownFailure``), so
    /// its probe and rate token are given back; else whether it found the service healthy.
    static func record(_ result: AttemptResult, of service: String, breakers: ServiceBreakers, rateLimits: ServiceRateLimits, now: UnixTime) {
        guard !result.ownFailure else { return giveBack(service, breakers: breakers, rateLimits: rateLimits) }
        breakers[service]?.record(healthy: !result.serviceFailed, now: now)
    }

    /// An attempt ``check(_:breakers:rateLimits:now:)`` let go sends nothing after all (no delivery
    /// was due, or its body could not be opened): its probe and its rate token are given back, or
    /// idle workers would spend the service's rate and later events wait for tokens nobody used.
    static func giveBack(_ service: String, breakers: ServiceBreakers, rateLimits: ServiceRateLimits) {
        breakers[service]?.withdrawProbe()
        rateLimits[service]?.giveBack()
    }
}

/// The breakers of every service that receives events, by name.
struct ServiceBreakers: Sendable {
    private let byName: [String: ServiceBreaker]
    let all: [ServiceBreaker]

    init(_ services: [DeliveryService], baseCooldown: Duration, logger: Logger, operational: OperationalEvents? = nil) {
        all = services.map { service in
            ServiceBreaker(
                service: service.name, failures: service.breakerFailures, baseCooldown: baseCooldown, longestCooldown: baseCooldown * 20,
                logger: logger, onChange: Self.announcing(service.name, to: operational))
        }
        byName = Dictionary(all.map { ($0.service, $0) }, uniquingKeysWith: { first, _ in first })
    }

    subscript(service: String) -> ServiceBreaker? { byName[service] }

    /// Tells `operational` when `service` is paused or resumed.
    private static func announcing(_ service: String, to operational: OperationalEvents?) -> (@Sendable (Bool, ServiceBreaker.Snapshot) -> Void)? {
        guard let operational else { return nil }
        return { paused, snapshot in
            operational.serviceChanged(service, paused: paused, consecutiveFailures: snapshot.consecutiveFailures, pausedUntil: snapshot.openUntil)
        }
    }
}
