#if canImport(Glibc)
import Glibc
#endif

/// A file's identity and times, following links, to tell that it changed: a Kubernetes volume
/// renews its files by swapping a link to a new folder, and other tools rewrite them in place.
struct FileStamp: Equatable, Sendable {
    private var device: UInt64
    private var inode: UInt64
    private var size: Int64
    private var modified: [Int64]
    private var changed: [Int64]

    /// Nil for a file that is not there (or cannot be looked at).
    init?(path: String) {
        var status = stat()
        guard stat(path, &status) == 0 else { return nil }
        device = UInt64(status.st_dev)
        inode = UInt64(status.st_ino)
        size = Int64(status.st_size)
        modified = [Int64(status.st_mtim.tv_sec), Int64(status.st_mtim.tv_nsec)]
        changed = [Int64(status.st_ctim.tv_sec), Int64(status.st_ctim.tv_nsec)]
    }
}
