import KoraSidecarCore
import NIOConcurrencyHelpers

/// What `/readyz` reports: ready when both listeners are bound and the store accepts a write.
final class Readiness: Sendable {
    private let bound = NIOLockedValueBox<Set<String>>([])
    private let stopping = NIOLockedValueBox(false)
    private let store: any SidecarStore
    /// The store's write check, one at a time however often `/readyz` and `/metrics` are asked.
    private let storeCheck = SingleFlight<String?>()

    init(store: any SidecarStore) { self.store = store }

    func listenerBound(_ role: ListenerRole) async {
        bound.withLockedValue { _ = $0.insert(role.rawValue) }
    }

    /// The sidecar is stopping: the webhook listener takes no new connections, so nothing should
    /// send to it, though the internal listener still answers while in-flight webhooks finish.
    func stop() {
        stopping.withLockedValue { $0 = true }
    }

    /// Nil when ready, else why not, as a sentence.
    package func problem() async -> String? {
        if stopping.withLockedValue({ $0 }) { return "The sidecar is stopping." }
        let missing = [ListenerRole.webhooks, .internal].filter { role in !bound.withLockedValue { $0.contains(role.rawValue) } }
        if let role = missing.first { return "The \(role.rawValue) listener is not bound yet." }
        return await storeCheck.run { [store] in
            do {
                // Each store answers within its own time-out (5 s), a stalled disk included.
                try await store.checkWritable(at: .now())
                return nil
            } catch {
                return "The store does not accept writes: \(error)."
            }
        }
    }
}
