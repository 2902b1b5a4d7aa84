import NIOConcurrencyHelpers

/// The bytes a listener holds for request bodies, shared by all its connections: on the webhook
/// listener while they are received, on the internal one until Kora answered the call that carries
/// them. Each body is bounded by the listener's `maxBodyBytes`, but a few hundred clients sending
/// bodies near that size at once would take more memory than a container is given; past the budget
/// a body is refused with 503 (its client retries) instead of the process being killed.
///
/// The first ``free`` bytes of every body are not counted (`maxConnections` already bounds them):
/// Kora's webhooks, a few kilobytes, are then never refused, however many large bodies hold the budget.
package final class BodyBudget: Sendable {
    /// The bytes of each body the budget does not count.
    static let free = 64 << 10

    private let left: NIOLockedValueBox<Int>

    init(bytes: Int) {
        left = NIOLockedValueBox(bytes)
    }

    /// The budget for a listener: 64 MiB, or two of its largest bodies if that is more. A webhook
    /// is a few kilobytes, so this only ever refuses many large uploads at once.
    static func bytes(maxBodyBytes: Int) -> Int {
        max(64 << 20, maxBodyBytes.multipliedReportingOverflow(by: 2).partialValue)
    }

    /// Takes `count` bytes; false, taking nothing, when fewer are left.
    func take(_ count: Int) -> Bool {
        left.withLockedValue { left in
            guard count <= left else { return false }
            left -= count
            return true
        }
    }

    /// Gives back bytes taken.
    func give(_ count: Int) {
        left.withLockedValue { $0 += count }
    }
}
