import AsyncHTTPClient
import NIOCore
import NIOPosix
import NIOSSL

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// What an HTTP client error means, for every call the sidecar makes (deliveries, the Kora proxy,
/// `check-kora`): whether the request can have reached the other side, and a short description
/// for logs and attempt records that never holds a secret.
package enum HTTPClientFailure: Equatable {
    /// The connection was never established: nothing was sent, any method may be retried.
    case notSent
    /// No answer within the time-out.
    case timedOut
    /// The connection broke after the request may have been sent.
    case lost

    init(_ error: any Error) {
        switch error {
        case let error as HTTPClientError where error == .connectTimeout || error == .getConnectionFromPoolTimeout:
            self = .notSent
        case let error as HTTPClientError where error == .deadlineExceeded || error == .readTimeout:
            self = .timedOut
        case is NIOConnectionError:
            self = .notSent
        case let error as ChannelError:
            if case .connectTimeout = error { self = .notSent } else { self = .lost }
        case let error as IOError where [ECONNREFUSED, ENOENT, ENETUNREACH, EHOSTUNREACH, EADDRNOTAVAIL].contains(error.errnoCode):
            self = .notSent
        default:
            self = .lost
        }
    }

    /// What went wrong, in a few words.
    package static func describe(_ error: any Error) -> String {
        switch error {
        case let error as HTTPClientError where error == .deadlineExceeded || error == .readTimeout: "timed out"
        case let error as HTTPClientError where error == .connectTimeout: "connect timed out"
        case let error as HTTPClientError where error == .remoteConnectionClosed: "connection closed by the other side"
        // Its short description: the full one quotes the request's header values, the API key among them.
        case let error as HTTPClientError: "HTTP client error: \(error.shortDescription)"
        case let error as DeliveryClientError: error.description
        case is CancellationError: "cancelled before the answer"
        case ChannelError.connectTimeout(_): "connect timed out"
        // TLS errors carry no request data; the two an operator meets most are said in words.
        case let error as NIOSSLExtraError where error == .failedToValidateHostname:
            "TLS handshake failed: the certificate is not for the URL's host name or IP address"
        case is NIOSSLError, is NIOSSLExtraError, is BoringSSLError:
            "TLS handshake failed: \(tlsReason(error))"
        case let error as NIOConnectionError: connectFailure(error)
        case let error as IOError where error.errnoCode == ECONNREFUSED: "connection refused"
        case let error as IOError where error.errnoCode == EMFILE: "the sidecar is out of file descriptors for a new connection (EMFILE): raise its limit of open files"
        case let error as IOError where error.errnoCode == ENFILE: "the system is out of file descriptors for a new connection (ENFILE)"
        case let error as IOError where error.errnoCode == ENOENT: "no such socket file"
        case let error as IOError: "I/O error: \(String(cString: strerror(error.errnoCode))) (errno \(error.errnoCode))"
        default: "request failed: \(type(of: error))"
        }
    }

    /// Whether the sidecar itself could not open a connection (out of file descriptors): the
    /// attempt says nothing of the other side, so it must not count against a service's breaker.
    package static func isOwnLimit(_ error: any Error) -> Bool {
        switch error {
        case let error as IOError: error.errnoCode == EMFILE || error.errnoCode == ENFILE
        case let error as NIOConnectionError: !error.connectionErrors.isEmpty && error.connectionErrors.allSatisfy { isOwnLimit($0.error) }
        default: false
        }
    }

    /// Why no connection was made to a host name: a refusal if an address refused (an IPv6 address
    /// unreachable beside it says less), else the first address's failure, or that the name did not
    /// resolve; not "connection refused" for all of them, which sends an operator to a service that is up.
    private static func connectFailure(_ error: NIOConnectionError) -> String {
        let refused = error.connectionErrors.first { ($0.error as? IOError)?.errnoCode == ECONNREFUSED }
        if let failure = refused ?? error.connectionErrors.first { return describe(failure.error) }
        if error.dnsAError != nil || error.dnsAAAAError != nil { return "the host name did not resolve" }
        return "no address to connect to"
    }

    /// BoringSSL's reason, without the source file it names (the build's own paths).
    private static func tlsReason(_ error: any Error) -> String {
        let text = String(describing: error)
        if text.contains("CERTIFICATE_VERIFY_FAILED") {
            return "the certificate did not verify (its authority is trusted neither by the system nor by delivery.caFile, or it expired)"
        }
        return String(text.replacing(#/ at /[^\s\])]*/#, with: "").prefix(300))
    }
}
