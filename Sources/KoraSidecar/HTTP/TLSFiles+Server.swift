import HummingbirdCore
import HummingbirdTLS
import KoraSidecarCore
import NIOSSL

extension TLSFiles {
    /// The server TLS configuration from the PEM files: the certificate chain and its key, TLS 1.2
    /// at least.
    /// - Throws: ``StartupError`` naming the key and the file that cannot be used.
    func serverConfiguration() throws -> TLSConfiguration {
        let chain: [NIOSSLCertificate]
        do {
            chain = try NIOSSLCertificate.fromPEMFile(certificateFile)
        } catch {
            throw StartupError("The certificate \(certificateFile) (webhooks.tls.certificateFile) cannot be read as PEM.")
        }
        guard !chain.isEmpty else {
            throw StartupError("The certificate \(certificateFile) (webhooks.tls.certificateFile) holds no certificate.")
        }
        let key: NIOSSLPrivateKey
        do {
            key = try NIOSSLPrivateKey(file: privateKeyFile, format: .pem)
        } catch {
            throw StartupError("The private key \(privateKeyFile) (webhooks.tls.privateKeyFile) cannot be read as PEM.")
        }
        var configuration = TLSConfiguration.makeServerConfiguration(certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(key))
        configuration.minimumTLSVersion = .tlsv12
        // Built here, once, so that a key of another certificate is this sentence, not a failure
        // deep in the listener's start.
        do {
            _ = try NIOSSLContext(configuration: configuration)
        } catch {
            throw StartupError(
                "The private key \(privateKeyFile) (webhooks.tls.privateKeyFile) cannot be used with the certificate \(certificateFile) (webhooks.tls.certificateFile): is it the certificate's key?")
        }
        return configuration
    }
}

extension HTTPServerBuilder {
    /// The public listener's server: HTTP/1.1 with its limits, inside TLS when `tls` is set.
    static func webhookServer(_ limits: ListenerLimits, tls: TLSFiles?) throws -> HTTPServerBuilder {
        guard let tls else { return .sidecarHTTP1(limits) }
        return try .tls(.sidecarHTTP1(limits), tlsConfiguration: tls.serverConfiguration())
    }
}
