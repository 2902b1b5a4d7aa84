#if canImport(Glibc)
import Glibc
#endif
import NIOCore

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

/// When files read at start (certificates, certificate authorities) are read again, so that a
/// renewal needs no restart: looked at (a `stat` of each) at most once a second, read when they
/// changed, and after a read that failed (a passing failure: out of file descriptors, a permission
/// being fixed) again every 30 s until they change.
struct FileRereading: Sendable {
    static let lookInterval = TimeAmount.seconds(1)
    static let retryInterval = TimeAmount.seconds(30)

    private let paths: [String]
    /// The files as last looked at, whether they could be used or not.
    private var stamps: [FileStamp?]
    private var nextLook: NIODeadline
    private var retryAt: NIODeadline?

    /// Takes the files as they are now: make it before reading them at start.
    init(paths: [String], now: NIODeadline = .now()) {
        self.paths = paths
        stamps = paths.map { FileStamp(path: $0) }
        nextLook = now + Self.lookInterval
    }

    /// Whether a look is due at `now`; a true answer takes it.
    mutating func lookDue(now: NIODeadline) -> Bool {
        guard now >= nextLook else { return false }
        nextLook = now + Self.lookInterval
        return true
    }

    /// The files as they are now.
    func look() -> [FileStamp?] { paths.map { FileStamp(path: $0) } }

    /// Whether files that look as `stamps` at `now` are to be read; they become the ones last seen.
    mutating func shouldRead(_ stamps: [FileStamp?], now: NIODeadline) -> Bool {
        guard stamps != self.stamps || retryAt.map({ now >= $0 }) == true else { return false }
        self.stamps = stamps
        retryAt = nil
        return true
    }

    /// Whether files read as `stamps` are still the ones last seen: what they held may be used.
    func isLatest(_ stamps: [FileStamp?]) -> Bool { stamps == self.stamps }

    /// The read of files that looked as `stamps` failed at `now`.
    mutating func readFailed(_ stamps: [FileStamp?], now: NIODeadline) {
        if isLatest(stamps) { retryAt = now + Self.retryInterval }
    }
}
