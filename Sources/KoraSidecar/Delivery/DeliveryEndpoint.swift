import KoraSidecarCore
import NIOCore

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Where a service listens, resolved from its configuration once at start-up: what to connect to,
/// and the request line's target and `Host` header, so no delivery parses a URL.
package struct DeliveryEndpoint: Hashable, Sendable {
    enum Address: Hashable, Sendable {
        case tcp(host: String, port: Int)
        case unixSocket(path: String)
    }

    let address: Address
    /// Whether the connection speaks TLS (an `https` URL).
    let tls: Bool
    /// The host name sent for TLS's server name indication; nil for plain HTTP and for an IP
    /// address, which SNI cannot carry and the certificate's addresses are checked against.
    let serverName: String?
    /// The request target: the URL's path and query, as written.
    let target: String
    /// HTTP/1.1 requires one; for a Unix socket `localhost`, as nginx and Go's net/http refuse a
    /// request without it.
    let hostHeader: String

    /// Nil when `target` is not an `http` or `https` URL with a host (the configuration refuses those).
    init?(_ target: DeliveryTarget) {
        switch target {
        case .unixSocket(let socketPath, let path):
            self.init(address: .unixSocket(path: socketPath), tls: false, serverName: nil, target: path, hostHeader: "localhost")
        case .url(let text):
            guard let url = URLComponents(string: text), let scheme = url.scheme?.lowercased(), scheme == "http" || scheme == "https",
                let host = url.host, !host.isEmpty
            else { return nil }
            let tls = scheme == "https"
            let port = url.port ?? (tls ? 443 : 80)
            // An IPv6 literal keeps its brackets in the Host header, not in the address connected to.
            let bare = host.hasPrefix("[") && host.hasSuffix("]") ? String(host.dropFirst().dropLast()) : host
            let path = url.percentEncodedPath.isEmpty ? "/" : url.percentEncodedPath
            let isAddress = (try? SocketAddress(ipAddress: bare, port: 0)) != nil
            self.init(
                address: .tcp(host: bare, port: port), tls: tls, serverName: tls && !isAddress ? bare : nil,
                target: url.percentEncodedQuery.map { path + "?" + $0 } ?? path,
                hostHeader: url.port == nil ? host : "\(host):\(port)")
        }
    }

    private init(address: Address, tls: Bool, serverName: String?, target: String, hostHeader: String) {
        self.address = address
        self.tls = tls
        self.serverName = serverName
        self.target = target
        self.hostHeader = hostHeader
    }
}
