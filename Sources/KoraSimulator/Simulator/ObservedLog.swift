import KoraSidecar
import KoraSidecarCore

/// A list that grows while others wait for it to reach a state, with a time-out instead of sleeps:
/// the demo and the tests wait on what the simulator sent and what the receiving app got.
package actor ObservedLog<Element: Sendable> {
    private var elements: [Element] = []
    private var waiters: [Int: (predicate: @Sendable ([Element]) -> Bool, continuation: CheckedContinuation<Bool, Never>)] = [:]
    private var expired: Set<Int> = []
    private var nextID = 0

    /// An empty log.
    init() {}

    /// Everything appended so far, oldest first.
    package var all: [Element] { elements }

    /// Appends `element` and wakes the waiters whose condition now holds.
    package func append(_ element: Element) {
        elements.append(element)
        for (id, waiter) in waiters where waiter.predicate(elements) {
            waiters[id] = nil
            waiter.continuation.resume(returning: true)
        }
    }

    /// Waits until `predicate` holds for the elements, at most `timeout`; returns whether it held.
    @discardableResult
    package func wait(timeout: Duration, until predicate: @escaping @Sendable ([Element]) -> Bool) async -> Bool {
        if predicate(elements) { return true }
        let id = nextID
        nextID += 1
        return await withTaskGroup(of: Bool.self) { group in
            group.addTask { await self.register(id, predicate) }
            group.addTask {
                try? await Task.sleep(for: timeout)
                await self.expire(id)
                return false
            }
            let first = await group.next() ?? false
            group.cancelAll()
            return first
        }
    }

    /// Waits until at least one element satisfies `matching` and returns the first that does.
    package func first(timeout: Duration, where matching: @escaping @Sendable (Element) -> Bool) async -> Element? {
        guard await wait(timeout: timeout, until: { $0.contains(where: matching) }) else { return nil }
        return elements.first(where: matching)
    }

    private func register(_ id: Int, _ predicate: @escaping @Sendable ([Element]) -> Bool) async -> Bool {
        if expired.remove(id) != nil { return false }
        if predicate(elements) { return true }
        return await withCheckedContinuation { continuation in
            waiters[id] = (predicate, continuation)
        }
    }

    private func expire(_ id: Int) {
        if let waiter = waiters.removeValue(forKey: id) {
            waiter.continuation.resume(returning: false)
        } else {
            expired.insert(id)
        }
    }
}
