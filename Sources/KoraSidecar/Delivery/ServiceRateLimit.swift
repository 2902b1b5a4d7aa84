import KoraSidecarCore
import NIOConcurrencyHelpers

/// `deliver.maxPerSecond` for one service in this replica: a token bucket shared by the service's
/// workers (and `direct` mode), holding at most one second's worth, so a pause is not followed by
/// a burst larger than the service accepts in a second.
final class ServiceRateLimit: Sendable {
    private struct Bucket {
        var tokens: Double
        var updated: UnixTime
    }

    private let perSecond: Double
    private let bucket: NIOLockedValueBox<Bucket>

    init(perSecond: Double, now: UnixTime = .now()) {
        self.perSecond = perSecond
        self.bucket = NIOLockedValueBox(Bucket(tokens: perSecond, updated: now))
    }

    /// Takes a token at `now` and returns zero, or returns how long to wait for one (taking none).
    func take(now: UnixTime) -> Duration {
        bucket.withLockedValue { bucket in
            let elapsed = Double(max(0, now.milliseconds - bucket.updated.milliseconds)) / 1000
            bucket.tokens = min(perSecond, bucket.tokens + elapsed * perSecond)
            bucket.updated = now
            guard bucket.tokens < 1 else {
                bucket.tokens -= 1
                return .zero
            }
            return .milliseconds(Int64(((1 - bucket.tokens) / perSecond * 1000).rounded(.up)))
        }
    }

    /// Returns a token that was taken for an attempt that then sent nothing.
    func giveBack() {
        bucket.withLockedValue { $0.tokens = min(perSecond, $0.tokens + 1) }
    }
}

/// The rate limits of the services that set `deliver.maxPerSecond`, by name.
struct ServiceRateLimits: Sendable {
    private let byName: [String: ServiceRateLimit]

    init(_ services: [DeliveryService]) {
        byName = Dictionary(
            services.compactMap { service in service.maxPerSecond.map { (service.name, ServiceRateLimit(perSecond: Double($0))) } },
            uniquingKeysWith: { first, _ in first })
    }

    subscript(service: String) -> ServiceRateLimit? { byName[service] }
}
