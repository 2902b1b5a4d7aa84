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

    /// What can be retried in bulk.
    package enum BulkRetry: String, Sendable {
        /// Every dead delivery, due now.
        case dead
        /// Every unrouted event, routed again with the configured services.
        case unrouted

        static let choices = "dead or unrouted"
    }

    /// Retries everything of `kind`; the answer in JSON.
    static func retry(_ kind: BulkRetry, store: any SidecarStore, router: EventRouter) async throws -> JSONValue {
        switch kind {
        case .dead:
            return ["status": "dead", "requeued": .int(try await store.requeueAllDead(at: .now()))]
        case .unrouted:
            let result = try await router.routeUnrouted(at: .now())
            return [
                "status": "unrouted", "routedEvents": .int(result.routedEvents), "deliveries": .int(result.deliveries),
                "stillUnrouted": .int(result.stillUnrouted),
            ]
        }
    }
}
