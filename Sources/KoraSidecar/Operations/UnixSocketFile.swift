#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// File-system care for listeners on Unix sockets.
enum UnixSocketFile {
    /// Limits the socket to its owner and group (mode 0660): the internal API is not for everyone.
    static func restrict(_ path: String) {
        chmod(path, 0o660)
    }
}
