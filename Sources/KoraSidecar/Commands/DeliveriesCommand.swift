import KoraSidecarCore
import Logging

/// The `deliveries` command's work, over a store that `serve` may be using at the same time.
package enum DeliveriesCommand {
    /// What to do.
    package enum Action: Sendable {
        case list(status: String?, service: String?, limit: Int)
        case show(id: Int64)
        case retry(id: Int64)
        case retryAll(OperatorActions.RetrySelection)
        case replay(eventID: String, service: String?)
        case erase(OperatorActions.ErasureSubject)
        case reseal

        /// The service it is limited to, if any.
        package var service: String? {
            switch self {
            case .list(_, let service, _), .replay(_, let service): service
            case .retryAll(let selection): selection.filter.service
            default: nil
            }
        }
    }

    /// Runs `action` against `store` (`services`: where unrouted events may now go) and returns the text to print.
    /// - Throws: ``StartupError`` for a status that does not exist or an unknown id.
    package static func run(_ action: Action, store: any SidecarStore, services: [DeliveryService], logger: Logger) async throws -> String {
        switch action {
        case .list(let statusText, let service, let limit):
            let listing = try statusText.map { text in
                guard let listing = OperatorActions.Listing(rawValue: text) else {
                    throw StartupError("--status must be \(OperatorActions.Listing.choices), not \(text).")
                }
                return listing
            }
            return render(try await OperatorActions.list(listing, service: service, limit: limit, store: store))
        case .show(let id):
            guard let detail = try await store.delivery(id: id) else { throw StartupError("There is no delivery \(id).") }
            return render(OperatorActions.show(detail, services: services))
        case .retry(let id):
            switch try await OperatorActions.retry(deliveryID: id, store: store) {
            case .requeued: return "Delivery \(id) is queued again."
            case .bodyGone(let problem): throw StartupError("Delivery \(id) cannot be sent again: its body is gone (\(problem.state)).")
            case .notFound: throw StartupError("Delivery \(id) does not exist or was already delivered.")
            }
        case .retryAll(let selection):
            return try await OperatorActions.retry(selection, store: store, router: EventRouter(services: services, store: store)).sentence
        case .replay(let eventID, let service):
            let outcome = try await OperatorActions.retry(
                .replay(eventID: eventID, service: service), store: store, router: EventRouter(services: services, store: store))
            guard outcome.selected > 0 else {
                if outcome.bodyGone > 0 { throw StartupError("Event \(eventID) cannot be sent again: its body is gone (retention or erasure).") }
                let pending = try await OperatorActions.pendingDeliveries(ofEvent: eventID, service: service, store: store)
                if pending > 0 {
                    return "Event \(eventID) is already queued for \(pending) \(pending == 1 ? "delivery" : "deliveries"), not yet sent; nothing more to do."
                }
                throw StartupError("Event \(eventID) has no delivered or dead delivery\(service.map { " to \($0)" } ?? "") to send again.")
            }
            return "Event \(eventID) is queued again for \(outcome.selected) \(outcome.selected == 1 ? "delivery" : "deliveries")."
        case .erase(let subject):
            return render(try await OperatorActions.erase(subject, store: store, logger: logger).json)
        case .reseal:
            let report = try await store.reseal()
            let unreadable = report.unreadable == 0 ? "" : " \(report.unreadable) were left as they are: no configured key opens them."
            return "\(report.resealed) stored bodies were sealed again with the current key.\(unreadable)"
        }
    }

    private static func render(_ value: JSONValue) -> String { JSONWriter.prettyString(value) }
}
