import Foundation

/// What running under a sanitizer changes for the tests. `scripts/sanitize` sets
/// `KORA_SIDECAR_SANITIZER` to `address` or `thread`: everything runs several times slower, and the
/// sanitizer's allocator keeps memory that a plain build gives back to malloc.
enum Sanitizer {
    /// `address`, `thread`, or nil for a plain build.
    static let active = ProcessInfo.processInfo.environment["KORA_SIDECAR_SANITIZER"]

    /// Test time-outs and waits are multiplied by this: 1 in a plain build, 10 under a sanitizer.
    /// (The waits poll a condition, so a longer bound only costs time when something is wrong.)
    /// A test that gives the sidecar a one-second time-out writes it as `Sanitizer.slowdown` seconds.
    static let slowdown = active == nil ? 1 : 10

    /// Memory a sanitizer may hold after the code under test freed it: AddressSanitizer's quarantine
    /// (`quarantine_size_mb=32` in scripts/sanitize) or ThreadSanitizer's shadow of what was touched.
    static let retainedKilobytes = active == nil ? 0 : 64 * 1024

    /// For a child whose leaks are known and not ours: after a database restart, postgres-nio (1.33)
    /// never resumes an operation or two that the store's deadline gave up on (a few kB each, measured
    /// with AddressSanitizer; still suspended 25 s after recovery), and LeakSanitizer reports them at
    /// exit. Leak checking is off for that one child.
    static var leaksNotFatal: [String: String] {
        guard active == "address" else { return [:] }
        return ["ASAN_OPTIONS": (childEnvironment["ASAN_OPTIONS"].map { $0 + ":" } ?? "") + "detect_leaks=0"]
    }

    /// The sanitizer's options, passed on to every child process: the sanitized `kora-sidecar`
    /// then fails its exit status on a leak or a race, just as the test runner does.
    static let childEnvironment = ProcessInfo.processInfo.environment.filter {
        ["ASAN_OPTIONS", "LSAN_OPTIONS", "TSAN_OPTIONS"].contains($0.key)
    }
}
