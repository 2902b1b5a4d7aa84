import KoraSidecarCore
import Logging
import NIOConcurrencyHelpers
import ServiceLifecycle

/// Which service created each verification through the proxy, for `onlyOwnVerifications`.
///
/// The store is the truth. When an origin cannot be written (the store briefly unavailable), the
/// verification exists at Kora all the same, and its later events would go to no service while
/// Kora got its 200 for them. So the origin is kept in memory, routing consults it meanwhile, and it
/// is written again until it is stored; events of the verification kept as unrouted in between are
/// then routed. Only a stop before the write succeeds loses it, and says so.
final class VerificationOrigins: Service, Sendable {
    private let store: any SidecarStore
    private let services: [DeliveryService]
    private let unwritten = NIOLockedValueBox<[String: (service: String, at: UnixTime)]>([:])
    private let bell = Doorbell()
    private let logger: Logger
    /// How long a failed write waits before the next try.
    private let retryDelay: Duration

    init(store: any SidecarStore, services: [DeliveryService], retryDelay: Duration = .seconds(2), logger: Logger) {
        self.store = store
        self.services = services
        self.retryDelay = retryDelay
        self.logger = logger
    }

    /// Remembers that `service` created verification `id`: in the store now, or as soon as it can be;
    /// unless an origin is recorded for it first (the first is kept, see ``SidecarStore/recordOrigin(verificationID:service:at:)``).
    func record(_ id: String, service: String) async {
        let at = UnixTime.now()
        do {
            try await store.recordOrigin(verificationID: id, service: service, at: at)
        } catch {
            unwritten.withLockedValue { $0[id] = $0[id] ?? (service, at) }
            bell.ring()
            logger.error(
                "The origin of a verification could not be stored yet; it is kept in memory and written again",
                metadata: ["service": "\(service)", "verification.id": "\(id)", "error": "\(error)"])
        }
    }

    /// The service that created `id`, if the proxy saw it.
    func origin(of id: String) async throws -> String? {
        if let kept = unwritten.withLockedValue({ $0[id]?.service }) { return kept }
        return try await store.origin(ofVerification: id)
    }

    /// Writes the origins kept in memory until each is stored, and once more at the stop.
    package func run() async throws {
        await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                let generation = self.bell.generation
                if await self.writeUnwritten() {
                    try? await Task.sleep(for: self.retryDelay)
                } else {
                    await self.bell.wait(after: generation, timeout: .seconds(3600))
                }
            }
        }
        if await writeUnwritten() {
            for (id, origin) in unwritten.withLockedValue({ $0 }) {
                logger.error(
                    "The origin of a verification was never stored; onlyOwnVerifications will not route its events",
                    metadata: ["service": "\(origin.service)", "verification.id": "\(id)"])
            }
        }
    }

    /// Tries every origin kept in memory once; whether any is still unwritten.
    private func writeUnwritten() async -> Bool {
        let pending = unwritten.withLockedValue { $0 }
        var failed = false
        for (id, origin) in pending {
            do {
                try await store.recordOrigin(verificationID: id, service: origin.service, at: origin.at)
            } catch {
                failed = true
                continue
            }
            unwritten.withLockedValue { $0[id] = nil }
            logger.notice("The origin of a verification is stored after all", metadata: ["service": "\(origin.service)", "verification.id": "\(id)"])
            // Its events that came meanwhile and found no service (another replica's, a restart's).
            do {
                _ = try await EventRouter(services: services, store: store, origins: self)
                    .routeUnrouted(at: .now(), filter: DeliveryFilter(statuses: [], verificationID: id))
            } catch {
                logger.warning(
                    "The verification's unrouted events could not be routed now; route them with deliveries retry --unrouted --verification",
                    metadata: ["verification.id": "\(id)", "error": "\(error)"])
            }
        }
        return failed
    }
}
