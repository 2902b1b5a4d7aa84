#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Whether the file system holding the SQLite store has room for more events. SQLite reuses its
/// log's space after a checkpoint, so on a full disk the readiness check's one-row write can still
/// succeed while every webhook's write fails: readiness looks at the free space too.
enum DiskSpace {
    /// Below this, the store is not ready: a few hundred events' worth, the margin an operator has
    /// to act before writes fail.
    static let minimumFreeBytes: UInt64 = 1 << 20

    /// The bytes this process may still write on the file system holding `path` (root may use the
    /// blocks kept for it); nil when it cannot be said.
    static func freeBytes(at path: String) -> UInt64? {
        var info = statvfs()
        guard statvfs(path, &info) == 0 else { return nil }
        let blocks = geteuid() == 0 ? UInt64(info.f_bfree) : UInt64(info.f_bavail)
        return blocks.multipliedReportingOverflow(by: UInt64(info.f_frsize)).partialValue
    }
}

/// The store's file system has less than ``DiskSpace/minimumFreeBytes`` free.
struct StoreDiskFull: Error, CustomStringConvertible {
    let freeBytes: UInt64
    var description: String {
        "the file system holding storage.sqlitePath has \(freeBytes) bytes free, less than \(DiskSpace.minimumFreeBytes); free some space"
    }
}
