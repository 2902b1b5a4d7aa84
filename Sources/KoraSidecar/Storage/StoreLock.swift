#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import KoraSidecarCore

/// Keeps a second `serve` off a SQLite store that one already serves: every start releases the
/// store's leases, so a second process would send again, at once, the deliveries the first has in
/// flight (a restart whose new process starts while the old one still drains, or two services
/// given one path). An advisory lock on `<store>.lock`, which the kernel gives back when the
/// process ends however it ends. One-shot commands do not take it: they run beside `serve`.
final class StoreLock: Sendable {
    private let descriptor: Int32

    /// Takes the lock of the store at `storePath`.
    /// - Throws: ``StartupError`` when another process holds it, naming it, or the file cannot be made.
    init(storePath: String) throws {
        let path = storePath + ".lock"
        let descriptor = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard descriptor >= 0 else {
            throw StartupError("The store's lock file \(path) cannot be opened: \(FileAccess.problem(writing: path) ?? "check that this user may write in its folder").")
        }
        guard flock(descriptor, LOCK_EX | LOCK_NB) == 0 else {
            var bytes = [UInt8](repeating: 0, count: 32)
            let count = pread(descriptor, &bytes, bytes.count, 0)
            close(descriptor)
            let holder = count > 0 ? Int32(String(decoding: bytes[..<count].prefix { $0 != UInt8(ascii: "\n") }, as: UTF8.self)).map { "process \($0)" } : nil
            throw StartupError(
                "The store \(storePath) (storage.sqlitePath) is in use by another kora-sidecar serve (\(holder ?? "see \(path)")): "
                    + "stop it first, or give each its own storage.sqlitePath (replicas share a store through storage.postgresURL).")
        }
        // Who holds it, for the sentence above; the lock does not depend on it.
        let pid = Array("\(getpid())\n".utf8)
        _ = ftruncate(descriptor, 0)
        _ = pwrite(descriptor, pid, pid.count, 0)
        self.descriptor = descriptor
    }

    /// Gives the lock back (after the store closed).
    func release() {
        close(descriptor)
    }
}
