#if canImport(Glibc)
import KoraSidecarCore
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

    /// Makes `path` free for a new listener, in a folder it can be created in: a socket file left by
    /// a crashed run is removed, but a socket on which a live process still answers, a file that is
    /// not a socket, or a folder that is missing or not writable, is a start-up error naming `key`
    /// (the listener would otherwise take the path from its owner, or fail deep in its start).
    static func replaceIfStale(_ path: String, key: String) throws(StartupError) {
        let folder = path.lastIndex(of: "/").map { $0 == path.startIndex ? "/" : String(path[..<$0]) } ?? "."
        guard access(folder, W_OK | X_OK) == 0 else {
            throw StartupError("The folder \(folder) of \(path) (\(key)) does not exist or cannot be written; create it or choose another path.")
        }
        var info = stat()
        guard lstat(path, &info) == 0 else { return }
        guard info.st_mode & S_IFMT == S_IFSOCK else {
            throw StartupError("\(path) (\(key)) exists and is not a socket; remove it or choose another path.")
        }
        if isAnswering(path) {
            throw StartupError("Another process is listening on \(path) (\(key)); stop it or choose another path.")
        }
        guard unlink(path) == 0 || errno == ENOENT else {
            throw StartupError("The stale socket file \(path) (\(key)) cannot be removed (errno \(errno)).")
        }
    }

    /// Whether a process accepts connections on the socket at `path` (a non-blocking connect: a
    /// full backlog also counts as alive).
    static func isAnswering(_ path: String) -> Bool {
        #if canImport(Darwin)
        let descriptor = socket(AF_UNIX, SOCK_STREAM, 0)
        #else
        let descriptor = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        #endif
        guard descriptor >= 0 else { return false }
        defer { close(descriptor) }
        _ = fcntl(descriptor, F_SETFL, fcntl(descriptor, F_GETFL) | O_NONBLOCK)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard bytes.count < capacity else { return false }
        withUnsafeMutableBytes(of: &address.sun_path) { buffer in
            buffer.copyBytes(from: bytes)
        }
        let result = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        return result == 0 || errno == EAGAIN || errno == EINPROGRESS
    }
}
