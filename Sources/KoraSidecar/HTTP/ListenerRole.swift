import KoraSidecarCore

/// Which listener a ``SidecarOptions/onListening`` call is about.
package enum ListenerRole: String, Sendable {
    /// The public webhook listener.
    case webhooks
    /// The internal listener (API proxy, health, metrics, admin).
    case `internal`
    /// The optional metrics listener (`metrics.listen`).
    case metrics
}
