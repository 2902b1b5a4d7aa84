/// The `deliveries` command's work, over a store that `serve` may be using at the same time.
public enum DeliveriesCommand {
    /// What to do.
    public enum Action: Sendable {
        case list(status: String?, limit: Int)
        case show(id: Int64)
        case retry(id: Int64)
        case retryAllDead
    }

    /// Runs `action` against `store` and returns the text to print.
    /// - Throws: ``StartupError`` for a status that does not exist or an unknown id.
    public static func run(_ action: Action, store: any SidecarStore) async throws -> String {
        switch action {
        case .list(let statusText, let limit):
            if statusText == "quarantined" {
                return try await render(.array(store.quarantined(limit: limit).map(\.listingJSON)))
            }
            let status = try statusText.map { text in
                guard let status = DeliveryStatus(rawValue: text) else {
                    throw StartupError("--status must be pending, delivered, dead or quarantined, not \(text).")
                }
                return status
            }
            return try await render(.array(store.deliveries(status: status, limit: limit).map(\.listingJSON)))
        case .show(let id):
            guard let detail = try await store.delivery(id: id) else { throw StartupError("There is no delivery \(id).") }
            return render(detail.listingJSON)
        case .retry(let id):
            guard try await store.requeue(id: id, at: .now()) else {
                throw StartupError("Delivery \(id) does not exist or was already delivered.")
            }
            return "Delivery \(id) is queued again."
        case .retryAllDead:
            let count = try await store.requeueAllDead(at: .now())
            return "\(count) dead deliveries are queued again."
        }
    }

    private static func render(_ value: JSONValue) -> String { JSONWriter.prettyString(value) }
}
