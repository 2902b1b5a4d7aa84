import KoraSidecarCore
import Logging
import NIOConcurrencyHelpers

/// The sidecar's own events, delivered like Kora's (stored, signed, retried) to the services that
/// subscribe to them by naming them in `deliver.events` (`sidecar.*` or one type):
///
/// - `sidecar.delivery.dead`: a delivery gave up on a service;
/// - `sidecar.service.paused` / `sidecar.service.resumed`: a service's circuit breaker opened or closed.
///
/// Each body is `{"id", "type", "occurredAt", "data": {…}}` (docs/delivery.md shows each `data`).
final class OperationalEvents: Sendable {
    private let store: any SidecarStore
    private let services: [DeliveryService]
    private let logger: Logger
    /// Wakes the dispatcher's workers of the given services (set once the dispatcher exists).
    private let wake = NIOLockedValueBox<(@Sendable ([String]) -> Void)?>(nil)
    /// The events being stored, by a number of their own, so that a stop can wait for them.
    private let storing = NIOLockedValueBox<(next: Int, tasks: [Int: Task<Void, Never>])>((0, [:]))

    init(store: any SidecarStore, services: [DeliveryService], logger: Logger) {
        self.store = store
        self.services = services.filter { service in service.events.patterns.contains { $0.hasPrefix(EventFilter.sidecarPrefix) } }
        self.logger = logger
    }

    /// Where new deliveries are announced.
    func wakeUp(with notify: @escaping @Sendable ([String]) -> Void) { wake.withLockedValue { $0 = notify } }

    /// What to announce, stored with the result that makes it so (``SidecarStore/finish(deliveryID:leasedUntil:attempt:next:announcing:)``),
    /// when a delivery of `event` to `service` is dead after `attempts` attempts: so that an erasure of
    /// its verification cannot come between the two. Nil when no service subscribes.
    func deadDelivery(_ event: KoraEvent, service: String, deliveryID: Int64, attempts: Int, lastStatusCode: Int?, lastError: String?) -> Announcement? {
        // A dead operational event announces nothing: no event about an event about an event.
        guard !event.type.hasPrefix(EventFilter.sidecarPrefix) else { return nil }
        return announcement(
            EventFilter.deadDelivery,
            [
                "service": .string(service), "deliveryId": .number(String(deliveryID)), "attempts": .int(attempts),
                "lastStatusCode": lastStatusCode.map(JSONValue.int) ?? .null, "lastError": .optional(lastError),
                "event": ["id": .string(event.id), "type": .string(event.type), "verificationId": .optional(event.verificationID)],
            ], about: event.verificationID)
    }

    /// Wakes the services an announcement stored with a result goes to.
    func stored(_ announcement: Announcement) {
        wake.withLockedValue { $0 }?(announcement.services)
    }

    /// `service`'s breaker opened (`pausedUntil` set) or closed.
    func serviceChanged(_ service: String, paused: Bool, consecutiveFailures: Int, pausedUntil: UnixTime?) {
        var data: [JSONMember] = [.init("service", .string(service))]
        if paused {
            data += [.init("consecutiveFailures", .int(consecutiveFailures)), .init("pausedUntil", .optional(pausedUntil?.iso8601Milliseconds))]
        }
        emit(paused ? EventFilter.servicePaused : EventFilter.serviceResumed, .object(data))
    }

    /// An event of `type` for the services that subscribe to it (nil: none does); `about` is the
    /// verification it names, so that erasing that verification erases it too.
    private func announcement(_ type: String, _ data: JSONValue, about verificationID: String? = nil) -> Announcement? {
        let recipients = services.filter { $0.events.matches(type) }.map(\.name)
        guard !recipients.isEmpty else { return nil }
        let id = "sdc_" + RandomID.make() + RandomID.make()
        let body = JSONWriter.encode(["id": .string(id), "type": .string(type), "occurredAt": .string(UnixTime.now().iso8601Milliseconds), "data": data])
        let event = KoraEvent(
            id: id, type: type, verificationID: verificationID, normalizedBody: body, originalBody: body, originalHeaders: [], signatureVerified: true)
        return Announcement(event: event, services: recipients)
    }

    /// Stores and announces an event of `type`.
    private func emit(_ type: String, _ data: JSONValue) {
        guard let announcement = announcement(type, data) else { return }
        let (event, recipients, now) = (announcement.event, announcement.services, UnixTime.now())
        let wake = wake.withLockedValue { $0 }
        // Stored apart from the caller (a breaker announces under its lock), but counted: the task
        // removes itself under the same lock it was added under, so it can never finish first.
        storing.withLockedValue { storing in
            let number = storing.next
            storing.next += 1
            storing.tasks[number] = Task {
                do {
                    _ = try await store.enqueue(event, services: recipients, at: now, dedupSince: now)
                    wake?(recipients)
                } catch {
                    logger.error("Operational event not stored", metadata: ["event.type": "\(type)", "error": "\(error)"])
                }
                self.storing.withLockedValue { _ = $0.tasks.removeValue(forKey: number) }
            }
        }
    }

    /// Waits until every event announced so far is stored: the dispatcher's last deliveries may
    /// announce a death or a pause just before the store closes, which would lose them.
    func finishStoring() async {
        while let tasks = storing.withLockedValue({ $0.tasks.isEmpty ? nil : Array($0.tasks.values) }) {
            for task in tasks { await task.value }
        }
    }
}
