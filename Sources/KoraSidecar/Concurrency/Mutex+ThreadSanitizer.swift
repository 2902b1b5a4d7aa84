#if KORA_SIDECAR_TSAN
import Foundation

/// The lock every type here uses, in a ThreadSanitizer build only (`scripts/sanitize thread` defines
/// `KORA_SIDECAR_TSAN`); it shadows the standard library's `Mutex` inside this module.
///
/// On Linux the standard `Mutex` waits on a futex that ThreadSanitizer cannot see, so every access it
/// guards is reported as a race. This one locks an `NSLock` (a pthread mutex, which ThreadSanitizer
/// intercepts), so the sanitizer checks the same locking discipline instead of flagging every lock.
public final class Mutex<Value>: @unchecked Sendable {
    private let lock = NSLock()
    private var value: Value

    public init(_ value: sending Value) { self.value = value }

    public func withLock<Result>(_ body: (inout Value) throws -> Result) rethrows -> Result {
        lock.lock()
        defer { lock.unlock() }
        return try body(&value)
    }
}
#endif
