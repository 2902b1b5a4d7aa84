#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import KoraSidecarCore
import Logging

/// Every connection a listener accepts, every kept-alive connection to a service and the store's
/// files take a file descriptor. At the process's limit, accepting fails over and over: an event
/// loop spins a whole core and leaves health checks unanswered, and the sidecar's own connections
/// fail as if the service refused them. Containers often start with a soft limit of 1024, below
/// what the default listeners may hold (1024 connections each), while the hard limit is far higher.
enum OpenFileLimit {
    /// Raises the soft limit to the hard one, and warns when even that is below what the
    /// listeners may hold (`connections`) with room for the rest.
    static func raise(toHold connections: Int, logger: Logger) {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return }
        if limit.rlim_cur < limit.rlim_max {
            var raised = limit
            raised.rlim_cur = limit.rlim_max
            if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &raised) == 0 { limit = raised }
        }
        let needed = connections + reserve
        guard limit.rlim_cur != rlim_t.max, limit.rlim_cur < rlim_t(needed) else { return }
        logger.warning(
            "The limit of open files is below what the listeners may hold: raise it (ulimit -n, LimitNOFILE), or lower their maxConnections",
            metadata: ["open_files.limit": "\(limit.rlim_cur)", "open_files.needed": "\(needed)"])
    }

    /// Besides the listeners' connections: connections to services and Kora, the store's files,
    /// the standard streams.
    static let reserve = 256
}

extension SidecarConfiguration {
    /// How many connections the listeners may hold at once.
    var listenerConnections: Int {
        webhooks.limits.maxConnections + `internal`.limits.maxConnections + (metrics.listen == nil ? 0 : metrics.limits.maxConnections)
    }
}
