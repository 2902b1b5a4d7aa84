#if canImport(Glibc)
import KoraSidecarCore
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Checks, before anything starts, that a TCP listener's address can be bound, so that a port in
/// use is one clear sentence naming the key instead of a failure deep in the service group.
enum ListenerPreflight {
    /// Throws a ``StartupError`` naming `key` when `host:port` cannot be bound.
    static func check(_ address: ListenAddress, key: String) throws {
        guard case .tcp(let host, let port) = address, port != 0 else { return }
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_PASSIVE
        var result: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(host, String(port), &hints, &result) == 0, let info = result else {
            throw StartupError("The host \(host) (\(key).host) cannot be resolved.")
        }
        defer { freeaddrinfo(result) }
        let fd = socket(info.pointee.ai_family, info.pointee.ai_socktype, info.pointee.ai_protocol)
        guard fd >= 0 else { return }
        defer { close(fd) }
        var yes: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, socklen_t(MemoryLayout<Int32>.size))
        if bind(fd, info.pointee.ai_addr, info.pointee.ai_addrlen) != 0 {
            let reason = errno == EADDRINUSE ? "is already in use" : "cannot be bound (\(String(cString: strerror(errno))))"
            throw StartupError("Port \(port) on \(host) (\(key)) \(reason).")
        }
    }
}
