import KoraSidecarCore
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL

/// The webhook listener's certificate and key, read again when their files change
/// (``FileRereading``): cert-manager and the kubelet renew them in place, and a certificate read
/// only at start expired under a sidecar that ran longer, and every webhook of Kora's failed its
/// handshake.
///
/// A handshake asks for the look, which is made off the event loops (a stalled volume must not
/// stall handshakes, and TLS errors met checking a pair would be left on the loop thread's error
/// queue, failing the handshake under way); the handshakes after the new pair is read serve it. A
/// pair that cannot be used (the key of another certificate, a file half written) leaves the one
/// served, and says so.
final class ServedCertificate: Sendable {
    private struct State {
        var rereading: FileRereading
        /// What handshakes serve instead of the pair read at start, once the files changed.
        var renewed: NIOSSLContextConfigurationOverride?
        var looking = false
    }

    private let files: TLSFiles
    private let state: NIOLockedValueBox<State>
    private let logger: Logger

    /// Takes the files as they are now: call it before reading them for the listener's start.
    init(files: TLSFiles, logger: Logger) {
        self.files = files
        self.logger = logger
        state = NIOLockedValueBox(State(rereading: FileRereading(paths: [files.certificateFile, files.privateKeyFile])))
    }

    /// The pair a handshake serves: the one read at start until the files change.
    func current() -> NIOSSLContextConfigurationOverride {
        let now = NIODeadline.now()
        let (look, renewed) = state.withLockedValue { state in
            let look = !state.looking && state.rereading.lookDue(now: now)
            if look { state.looking = true }
            return (look, state.renewed)
        }
        if look { NIOThreadPool.singleton.submit { _ in self.look(now) } }
        return renewed ?? .noChanges
    }

    private func look(_ now: NIODeadline) {
        let stamps = state.withLockedValue { $0.rereading }.look()
        let due = state.withLockedValue { state in
            defer { state.looking = false }
            return state.rereading.shouldRead(stamps, now: now)
        }
        guard due else { return }
        do {
            let (chain, key) = try files.readPair()
            var renewed = NIOSSLContextConfigurationOverride()
            renewed.certificateChain = chain.map { .certificate($0) }
            renewed.privateKey = .privateKey(key)
            // Not over a pair of files changed again meanwhile: the look after reads those.
            let served = state.withLockedValue { state in
                guard state.rereading.isLatest(stamps) else { return false }
                state.renewed = renewed
                return true
            }
            guard served else { return }
            let expiry = UnixTime(milliseconds: Int64(chain[0].notValidAfter) * 1000).iso8601Seconds
            logger.info("The webhook listener's TLS certificate was read again", metadata: ["tls.notValidAfter": "\(expiry)"])
        } catch {
            state.withLockedValue { $0.rereading.readFailed(stamps, now: now) }
            logger.error(
                "The webhook listener's TLS certificate files changed but cannot be used; the previous certificate is still served",
                metadata: ["error": "\(error)"])
        }
    }
}
