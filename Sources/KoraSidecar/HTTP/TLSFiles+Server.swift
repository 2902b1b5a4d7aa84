#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import HummingbirdCore
import HummingbirdTLS
import KoraSidecarCore
import Logging
import NIOSSL

extension TLSFiles {
    /// The server TLS configuration from the PEM files: the certificate chain and its key, TLS 1.2
    /// at least.
    /// - Throws: ``StartupError`` naming the key and the file that cannot be used.
    func serverConfiguration() throws -> TLSConfiguration {
        let (chain, key) = try readPair()
        return Self.serverConfiguration(chain: chain, key: key)
    }

    private static func serverConfiguration(chain: [NIOSSLCertificate], key: NIOSSLPrivateKey) -> TLSConfiguration {
        var configuration = TLSConfiguration.makeServerConfiguration(certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(key))
        configuration.minimumTLSVersion = .tlsv12
        return configuration
    }

    /// The certificate chain and its key, read from the files and checked to belong together.
    /// - Throws: ``StartupError`` naming the key and the file that cannot be used.
    func readPair() throws -> (chain: [NIOSSLCertificate], key: NIOSSLPrivateKey) {
        let chain = try PEMCertificates.read(certificateFile, key: "webhooks.tls.certificateFile")
        let key: NIOSSLPrivateKey
        if !FileManager.default.fileExists(atPath: privateKeyFile) {
            throw StartupError("The private key \(privateKeyFile) (webhooks.tls.privateKeyFile) does not exist.")
        }
        do {
            key = try NIOSSLPrivateKey(file: privateKeyFile, format: .pem)
        } catch {
            throw StartupError("The private key \(privateKeyFile) (webhooks.tls.privateKeyFile) cannot be read as PEM.")
        }
        // Built here, once, so that a key of another certificate is this sentence, not a failure
        // deep in the listener's start (or in every handshake after a renewal).
        do {
            _ = try NIOSSLContext(configuration: Self.serverConfiguration(chain: chain, key: key))
        } catch {
            throw StartupError(
                "The private key \(privateKeyFile) (webhooks.tls.privateKeyFile) cannot be used with the certificate \(certificateFile) (webhooks.tls.certificateFile): is it the certificate's key?")
        }
        return (chain, key)
    }
}

/// Certificates from a PEM file named by a configuration key.
enum PEMCertificates {
    /// - Throws: ``StartupError`` naming the key and the file: missing, not PEM, or holding none.
    static func read(_ path: String, key: String) throws -> [NIOSSLCertificate] {
        guard FileManager.default.fileExists(atPath: path) else { throw StartupError("The certificate file \(path) (\(key)) does not exist.") }
        let certificates: [NIOSSLCertificate]
        do {
            certificates = try NIOSSLCertificate.fromPEMFile(path)
        } catch {
            throw StartupError("The certificate file \(path) (\(key)) cannot be read as PEM.")
        }
        guard !certificates.isEmpty else { throw StartupError("The certificate file \(path) (\(key)) holds no certificate.") }
        return certificates
    }
}

extension SidecarConfiguration {
    /// Reads the certificate files `serve` reads at start-up, for `check-config`.
    /// - Throws: ``StartupError`` naming the key and the file that cannot be used.
    package func checkCertificateFiles() throws {
        _ = try webhooks.tls?.serverConfiguration()
        _ = try delivery.clientTLS()
    }
}

extension DeliveryConfiguration {
    /// How deliveries to `https` services verify certificates: the system's trust roots, and the
    /// certificate authorities of `delivery.caFile` besides (a company's own, for its services).
    func clientTLS() throws -> TLSConfiguration {
        var tls = TLSConfiguration.makeClientConfiguration()
        if let caFile { tls.additionalTrustRoots = [.certificates(try PEMCertificates.read(caFile, key: "delivery.caFile"))] }
        return tls
    }
}

extension HTTPServerBuilder {
    /// The public listener's server: HTTP/1.1 with its limits, inside TLS when `tls` is set.
    /// The certificate and key are read again when their files change: cert-manager and the
    /// kubelet renew them in place, and a certificate read only at start expired under a sidecar
    /// that ran longer, and every webhook of Kora's failed its handshake. A handshake serves the
    /// pair last read (``RereadFiles``); one that cannot be used leaves the one served, and says so.
    static func webhookServer(_ limits: ListenerLimits, tls: TLSFiles?, logger: Logger) throws -> HTTPServerBuilder {
        let http1 = HTTPServerBuilder.sidecarHTTP1(limits, listener: .webhooks, logger: logger)
        guard let tls else { return http1 }
        // Before the files are read: a change made meanwhile is read again at the first look.
        let renewed = RereadFiles(
            paths: [tls.certificateFile, tls.privateKeyFile],
            read: {
                let (chain, key) = try tls.readPair()
                var pair = NIOSSLContextConfigurationOverride()
                pair.certificateChain = chain.map { .certificate($0) }
                pair.privateKey = .privateKey(key)
                return (pair: pair, notValidAfter: UnixTime(milliseconds: Int64(chain[0].notValidAfter) * 1000))
            },
            didRead: { logger.info("The webhook listener's TLS certificate was read again", metadata: ["tls.notValidAfter": "\($0.notValidAfter.iso8601Seconds)"]) },
            didFail: { error in
                logger.error(
                    "The webhook listener's TLS certificate files changed but cannot be used; the previous certificate is still served",
                    metadata: ["error": "\(error)"])
            })
        var configuration = try tls.serverConfiguration()
        configuration.sslContextCallback = { _, promise in promise.succeed(renewed.current()?.pair ?? .noChanges) }
        return try .tls(http1, tlsConfiguration: configuration)
    }
}
