import KoraSidecarCore
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL

/// The webhook listener's certificate and key, read again when their files change: cert-manager
/// and the kubelet renew them in place, and a certificate read only at start expired under a
/// sidecar that ran longer, and every webhook of Kora's failed its handshake.
///
/// A handshake asks at most once a second for a look at the files, made off the event loops (a
/// stalled volume must not stall handshakes, and TLS errors met checking a pair would be left on the
/// loop thread's error queue, failing the handshake under way); the handshakes after the new pair
/// is read serve it. A pair that cannot be used (the key of another certificate, a file half
/// written) leaves the one served, says so, and is read again every 30 s until the files change.
final class ServedCertificate: Sendable {
    private struct State {
        /// The files as last looked at, whether their pair could be used or not.
        var stamps: [FileStamp?]
        /// What handshakes serve instead of the pair read at start, once the files changed.
        var renewed: NIOSSLContextConfigurationOverride?
        var nextLook: NIODeadline
        var looking = false
        /// When the pair that could not be used is read again though its files did not change (a
        /// failure that passes: out of file descriptors, a permission being fixed).
        var retryAt: NIODeadline?
    }

    static let lookInterval = TimeAmount.seconds(1)
    static let retryInterval = TimeAmount.seconds(30)

    private let files: TLSFiles
    private let state: NIOLockedValueBox<State>
    private let logger: Logger

    /// Takes the files as they are now: call it before reading them for the listener's start.
    init(files: TLSFiles, logger: Logger) {
        self.files = files
        self.logger = logger
        state = NIOLockedValueBox(State(stamps: Self.stamps(files), nextLook: .now() + Self.lookInterval))
    }

    /// The pair a handshake serves: the one read at start until the files change.
    func current() -> NIOSSLContextConfigurationOverride {
        let now = NIODeadline.now()
        let (look, renewed) = state.withLockedValue { state in
            let look = !state.looking && now >= state.nextLook
            if look {
                state.looking = true
                state.nextLook = now + Self.lookInterval
            }
            return (look, state.renewed)
        }
        if look { NIOThreadPool.singleton.submit { _ in self.look(now) } }
        return renewed ?? .noChanges
    }

    private func look(_ now: NIODeadline) {
        let stamps = Self.stamps(files)
        let due = state.withLockedValue { state in
            defer { state.looking = false }
            guard stamps != state.stamps || state.retryAt.map({ now >= $0 }) == true else { return false }
            state.stamps = stamps
            state.retryAt = nil
            return true
        }
        guard due else { return }
        do {
            let (chain, key) = try files.readPair()
            var renewed = NIOSSLContextConfigurationOverride()
            renewed.certificateChain = chain.map { .certificate($0) }
            renewed.privateKey = .privateKey(key)
            // Not over a pair of files changed again meanwhile: the look after reads those.
            let served = state.withLockedValue { state in
                guard state.stamps == stamps else { return false }
                state.renewed = renewed
                return true
            }
            guard served else { return }
            let expiry = UnixTime(milliseconds: Int64(chain[0].notValidAfter) * 1000).iso8601Seconds
            logger.info("The webhook listener's TLS certificate was read again", metadata: ["tls.notValidAfter": "\(expiry)"])
        } catch {
            state.withLockedValue { state in
                if state.stamps == stamps { state.retryAt = now + Self.retryInterval }
            }
            logger.error(
                "The webhook listener's TLS certificate files changed but cannot be used; the previous certificate is still served",
                metadata: ["error": "\(error)"])
        }
    }

    private static func stamps(_ files: TLSFiles) -> [FileStamp?] {
        [FileStamp(path: files.certificateFile), FileStamp(path: files.privateKeyFile)]
    }
}
