import KoraSidecarCore

/// What the `deliveries` command and the admin API both do over the store, so that the two say
/// the same thing in the same shape.
package enum OperatorActions {
    /// What an operator may list.
    enum Listing: String, Sendable, CaseIterable {
        case pending, delivered, dead, quarantined, unrouted

        /// The accepted values, for error messages.
        static let choices = "pending, delivered, dead, quarantined or unrouted"
    }

    /// The newest `limit` entries of `listing` (every delivery when nil), as operators see them.
    static func list(_ listing: Listing?, limit: Int, store: any SidecarStore) async throws -> JSONValue {
        switch listing {
        case .quarantined: .array(try await store.quarantined(limit: limit).map(\.listingJSON))
        case .unrouted: .array(try await store.unrouted(limit: limit).map(\.listingJSON))
        case .pending: .array(try await store.deliveries(status: .pending, limit: limit).map(\.listingJSON))
        case .delivered: .array(try await store.deliveries(status: .delivered, limit: limit).map(\.listingJSON))
        case .dead: .array(try await store.deliveries(status: .dead, limit: limit).map(\.listingJSON))
        case nil: .array(try await store.deliveries(status: nil, limit: limit).map(\.listingJSON))
        }
    }

    /// What a bulk retry selects: from the `deliveries retry` flags or the admin API's parameters.
    package struct RetrySelection: Sendable {
        /// What is retried: deliveries of these statuses, or unrouted events.
        package enum Scope: Sendable, Equatable {
            case deliveries([DeliveryStatus])
            case unrouted
        }

        package var scope: Scope
        /// The conditions (its statuses are the scope's).
        package var filter: DeliveryFilter
        package var dryRun: Bool

        /// `status` as an operator writes it: `dead`, `delivered` or `unrouted`.
        package init?(status: String, filter: DeliveryFilter = DeliveryFilter(statuses: []), dryRun: Bool = false) {
            let scope: Scope
            switch status {
            case "dead": scope = .deliveries([.dead])
            case "delivered": scope = .deliveries([.delivered])
            case "unrouted": scope = .unrouted
            default: return nil
            }
            self.init(scope: scope, filter: filter, dryRun: dryRun)
        }

        /// Sends an event again to the services that had it (delivered or dead): same id, next attempt number.
        package static func replay(eventID: String, service: String?) -> RetrySelection {
            RetrySelection(scope: .deliveries([.delivered, .dead]), filter: DeliveryFilter(statuses: [], service: service, eventID: eventID))
        }

        private init(scope: Scope, filter: DeliveryFilter, dryRun: Bool = false) {
            self.scope = scope
            self.filter = filter
            self.dryRun = dryRun
        }

        static let statusChoices = "dead, delivered or unrouted"
    }

    /// What a bulk retry did, or would do.
    package struct RetryOutcome: Sendable {
        package var selection: RetrySelection
        /// Deliveries queued again, or unrouted events routed.
        package var selected: Int
        /// For unrouted events: the deliveries created and the events that still match no service.
        package var deliveries = 0
        package var stillUnrouted = 0

        /// The admin API's answer.
        var json: JSONValue {
            var members: [JSONMember] = [.init("dryRun", .bool(selection.dryRun))]
            switch selection.scope {
            case .deliveries:
                members.append(.init(selection.dryRun ? "wouldRequeue" : "requeued", .int(selected)))
            case .unrouted:
                members += [
                    .init("routedEvents", .int(selected)), .init("deliveries", .int(deliveries)), .init("stillUnrouted", .int(stillUnrouted)),
                ]
            }
            return .object(members)
        }

        /// `dead ` or `delivered ` when one status was selected.
        private var statusWord: String {
            guard case .deliveries(let statuses) = selection.scope, statuses.count == 1 else { return "" }
            return statuses[0].rawValue + " "
        }

        /// The command's sentence.
        var sentence: String {
            switch (selection.scope, selection.dryRun) {
            case (.deliveries, true): "\(selected) \(statusWord)deliveries would be queued again."
            case (.deliveries, false): "\(selected) \(statusWord)deliveries are queued again."
            case (.unrouted, true):
                "\(selected) unrouted events would be routed (\(deliveries) deliveries); \(stillUnrouted) would still match no service."
            case (.unrouted, false):
                "\(selected) unrouted events were routed (\(deliveries) deliveries queued); \(stillUnrouted) still match no service."
            }
        }
    }

    /// Retries what `selection` selects, now.
    static func retry(_ selection: RetrySelection, store: any SidecarStore, router: EventRouter) async throws -> RetryOutcome {
        switch selection.scope {
        case .deliveries(let statuses):
            var filter = selection.filter
            filter.statuses = statuses
            return RetryOutcome(selection: selection, selected: try await store.requeue(filter, at: .now(), dryRun: selection.dryRun))
        case .unrouted:
            let result = try await router.routeUnrouted(at: .now(), filter: selection.filter, dryRun: selection.dryRun)
            return RetryOutcome(
                selection: selection, selected: result.routedEvents, deliveries: result.deliveries, stillUnrouted: result.stillUnrouted)
        }
    }
}
