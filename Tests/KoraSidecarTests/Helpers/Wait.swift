import Foundation

/// Why a wait ended without its condition.
struct TimedOut: Error, CustomStringConvertible {
    let what: String
    var description: String { "timed out waiting for \(what)" }
}

/// Polls `condition` until it holds or `timeout` passes (a condition with a time-out, never a bare sleep).
/// The time-out stretches under a sanitizer (``Sanitizer/slowdown``).
func waitUntil(
    _ what: String, timeout: Duration = .seconds(10), _ condition: () async throws -> Bool
) async throws {
    let deadline = ContinuousClock.now + timeout * Sanitizer.slowdown
    while ContinuousClock.now < deadline {
        if try await condition() { return }
        try await Task.sleep(for: .milliseconds(10))
    }
    if try await condition() { return }
    throw TimedOut(what: what)
}

/// A short, unique temporary directory (Unix socket paths must stay under 107 bytes).
func temporaryDirectory() throws -> String {
    let path = "/tmp/ks-" + String(UInt32.random(in: 0...UInt32.max), radix: 36)
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
}
