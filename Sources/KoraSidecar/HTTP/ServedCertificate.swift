#if canImport(Glibc)
import Glibc
#endif
import KoraSidecarCore
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOSSL

/// The webhook listener's certificate and key, read again when their files change: cert-manager
/// and the kubelet renew them in place, and a certificate read only at start expired under a
/// sidecar that ran longer, and every webhook of Kora's failed its handshake. A handshake looks at
/// the files, at most once a second, and the handshakes after the new pair is read serve it; a pair
/// that cannot be used (the key of another certificate, a file half written) leaves the one served,
/// and says so.
final class ServedCertificate: Sendable {
    private struct State {
        /// The files as last looked at, whether their pair could be used or not.
        var stamps: [FileStamp?]
        /// What handshakes serve instead of the pair read at start, once the files changed.
        var renewed: NIOSSLContextConfigurationOverride?
        var nextLook: NIODeadline
    }

    static let lookInterval = TimeAmount.seconds(1)

    private let files: TLSFiles
    private let state: NIOLockedValueBox<State>
    private let logger: Logger

    /// Takes the files as they are now: call it before reading them for the listener's start.
    init(files: TLSFiles, logger: Logger) {
        self.files = files
        self.logger = logger
        state = NIOLockedValueBox(State(stamps: Self.stamps(files), renewed: nil, nextLook: .now() + Self.lookInterval))
    }

    /// The pair a handshake at `now` serves: the one read at start until the files change.
    func current(now: NIODeadline = .now()) -> NIOSSLContextConfigurationOverride {
        let changed = state.withLockedValue { state -> [FileStamp?]? in
            guard now >= state.nextLook else { return nil }
            state.nextLook = now + Self.lookInterval
            let stamps = Self.stamps(files)
            guard stamps != state.stamps else { return nil }
            state.stamps = stamps
            return stamps
        }
        // Read off the event loop: TLS errors met while checking the new pair (the key of another
        // certificate) would be left on this thread's error queue, and fail the handshake under way.
        if let changed { Task.detached { self.readAgain(changed) } }
        return state.withLockedValue { $0.renewed } ?? .noChanges
    }

    /// Reads the files that looked as `stamps`; what they hold is served unless they changed again meanwhile.
    private func readAgain(_ stamps: [FileStamp?]) {
        do {
            let (chain, key) = try files.readPair()
            var renewed = NIOSSLContextConfigurationOverride()
            renewed.certificateChain = chain.map { .certificate($0) }
            renewed.privateKey = .privateKey(key)
            state.withLockedValue { state in
                if state.stamps == stamps { state.renewed = renewed }
            }
            let expiry = UnixTime(milliseconds: Int64(chain[0].notValidAfter) * 1000).iso8601Seconds
            logger.info("The webhook listener's TLS certificate was read again", metadata: ["tls.notValidAfter": "\(expiry)"])
        } catch {
            logger.error(
                "The webhook listener's TLS certificate files changed but cannot be used; the previous certificate is still served",
                metadata: ["error": "\(error)"])
        }
    }

    /// Each file's identity and times, following links (a Kubernetes volume swaps a link to a new
    /// folder); nil for a file that is not there.
    private static func stamps(_ files: TLSFiles) -> [FileStamp?] {
        [files.certificateFile, files.privateKeyFile].map { path in
            var status = stat()
            guard stat(path, &status) == 0 else { return nil }
            return FileStamp(
                device: UInt64(status.st_dev), inode: UInt64(status.st_ino), size: Int64(status.st_size),
                modified: [Int64(status.st_mtim.tv_sec), Int64(status.st_mtim.tv_nsec)],
                changed: [Int64(status.st_ctim.tv_sec), Int64(status.st_ctim.tv_nsec)])
        }
    }

    private struct FileStamp: Equatable {
        var device: UInt64
        var inode: UInt64
        var size: Int64
        var modified: [Int64]
        var changed: [Int64]
    }
}
