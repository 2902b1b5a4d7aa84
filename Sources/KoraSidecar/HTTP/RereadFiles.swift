import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// What files read at start (a certificate and its key, certificate authorities) hold, read again
/// when they change, so that a renewal needs no restart.
///
/// Whoever uses it asks ``current()``, which asks for a look (a `stat` of each file) at most once a
/// second, made on NIO's thread pool: a stalled volume stalls neither the event loops nor Swift's
/// few concurrency threads, and TLS errors met checking what was read are not left on the asking
/// thread's error queue (on an event loop, they failed the handshake under way). The files are
/// read when they changed; a read that fails leaves what was read before, and is tried again every
/// 30 s until they change (a passing failure: out of file descriptors, a permission being fixed).
final class RereadFiles<Value: Sendable>: Sendable {
    private static var lookInterval: TimeAmount { .seconds(1) }
    private static var retryInterval: TimeAmount { .seconds(30) }

    private struct State {
        /// The files as last looked at, whether what they held could be used or not.
        var stamps: [FileStamp?]
        var nextLook: NIODeadline
        var looking = false
        /// After a read that failed, when the same files are read again.
        var retryAt: NIODeadline?
        /// What the files held when last read again; nil while unchanged since start.
        var value: Value?
    }

    private let paths: [String]
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
        self.paths = paths
        state = NIOLockedValueBox(State(stamps: paths.map { FileStamp(path: $0) }, nextLook: .now() + Self.lookInterval))
        self.read = read
        self.didRead = didRead
        self.didFail = didFail
    }

    /// What the files held when last read again, or nil while they have not changed since start.
    func current() -> Value? {
        let now = NIODeadline.now()
        let (look, value) = state.withLockedValue { state in
            let look = !state.looking && now >= state.nextLook
            if look {
                state.looking = true
                state.nextLook = now + Self.lookInterval
            }
            return (look, state.value)
        }
        if look { NIOThreadPool.singleton.submit { _ in self.look(now) } }
        return value
    }

    private func look(_ now: NIODeadline) {
        let stamps = paths.map { FileStamp(path: $0) }
        let due = state.withLockedValue { state in
            defer { state.looking = false }
            guard stamps != state.stamps || state.retryAt.map({ now >= $0 }) == true else { return false }
            state.stamps = stamps
            state.retryAt = nil
            return true
        }
        guard due else { return }
        do {
            let value = try read()
            // Not over files changed again meanwhile: the look after reads those.
            let kept = state.withLockedValue { state in
                guard state.stamps == stamps else { return false }
                state.value = value
                return true
            }
            if kept { didRead(value) }
        } catch {
            state.withLockedValue { state in
                if state.stamps == stamps { state.retryAt = now + Self.retryInterval }
            }
            didFail(error)
        }
    }
}
