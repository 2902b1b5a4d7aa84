import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// What files read at start (a certificate and its key, certificate authorities) hold, read again
/// when they change (``FileRereading``), so that a renewal needs no restart.
///
/// Whoever uses it asks ``current()``, which asks for a look at most once a second, made on NIO's
/// thread pool: a stalled volume stalls neither the event loops nor Swift's few concurrency threads,
/// and TLS errors met checking what was read are not left on the asking thread's error queue (on an
/// event loop, they failed the handshake under way). A read that fails leaves what was read before.
final class RereadFiles<Value: Sendable>: Sendable {
    private struct State {
        var rereading: FileRereading
        /// What the files held when last read again; nil while unchanged since start.
        var value: Value?
        var looking = false
    }

    private let state: NIOLockedValueBox<State>
    private let read: @Sendable () throws -> Value
    private let didRead: @Sendable (Value) -> Void
    private let didFail: @Sendable (any Error) -> Void

    /// Takes the files as they are now: make it before reading them at start. `didRead` and
    /// `didFail` say what a read again gave (they log it).
    init(
        paths: [String], read: @escaping @Sendable () throws -> Value, didRead: @escaping @Sendable (Value) -> Void,
        didFail: @escaping @Sendable (any Error) -> Void
    ) {
        state = NIOLockedValueBox(State(rereading: FileRereading(paths: paths)))
        self.read = read
        self.didRead = didRead
        self.didFail = didFail
    }

    /// What the files held when last read again, or nil while they have not changed since start.
    func current() -> Value? {
        let now = NIODeadline.now()
        let (look, value) = state.withLockedValue { state in
            let look = !state.looking && state.rereading.lookDue(now: now)
            if look { state.looking = true }
            return (look, state.value)
        }
        if look { NIOThreadPool.singleton.submit { _ in self.look(now) } }
        return value
    }

    private func look(_ now: NIODeadline) {
        let stamps = state.withLockedValue { $0.rereading }.look()
        let due = state.withLockedValue { state in
            defer { state.looking = false }
            return state.rereading.shouldRead(stamps, now: now)
        }
        guard due else { return }
        do {
            let value = try read()
            // Not over files changed again meanwhile: the look after reads those.
            let kept = state.withLockedValue { state in
                guard state.rereading.isLatest(stamps) else { return false }
                state.value = value
                return true
            }
            if kept { didRead(value) }
        } catch {
            state.withLockedValue { $0.rereading.readFailed(stamps, now: now) }
            didFail(error)
        }
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
