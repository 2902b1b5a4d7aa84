#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The check every URL the product calls goes through (Kora's base URL, a service's `deliver.url`,
/// a callback, a command's target) before any HTTP client sees it.
package enum HTTPURL {
    /// Why `text` is not a URL to call, said after its name ("must be …"), or nil when it is one.
    ///
    /// A port beyond 65535 is refused here: Foundation reads any digits as a port, and the HTTP
    /// client traps on one when the host is an IP address. A user or password is refused unless
    /// `credentials` allows them (a callback URL Kora calls may carry them for a proxy in front of the
    /// sidecar): the sidecar's own clients never send them, and they would be printed with the configuration.
    package static func problem(_ text: String, credentials: Bool = false) -> String? {
        guard let url = URL(string: text), let scheme = url.scheme?.lowercased(), scheme == "http" || scheme == "https",
            let host = url.host, !host.isEmpty
        else { return "must be an http:// or https:// URL" }
        if let port = url.port, !(1...65535).contains(port) { return "must have a port from 1 to 65535, not \(port)" }
        if !credentials, url.user != nil || url.password != nil {
            return "must not hold a user name or password: credentials go in headers or secrets, never in a URL"
        }
        return nil
    }

    /// Whether `path` can go on a request line as it is: HTTP's clients refuse to send a space, a
    /// control character, a non-ASCII byte or any of `"<>\\^`{|}` there (RFC 9112), and a `#`
    /// would end it; those must be percent-encoded.
    package static func isRequestTarget(_ path: String) -> Bool {
        path.utf8.allSatisfy { byte in
            switch byte {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"): true
            default: "-._~:/?[]@!$&'()*+,;=%".utf8.contains(byte)
            }
        }
    }

    /// `text` with its user information, query and fragment, if any, shown as `***` (for the
    /// effective configuration): a callback's token is as often in its query as in its user part.
    /// The user part is found by its `@` in the authority, so that no escape a parser might refuse can show it.
    package static func masked(_ text: String) -> String {
        guard let scheme = text.firstRange(of: "://") else { return text }
        var masked = String(text[..<scheme.upperBound])
        var rest = text[scheme.upperBound...]
        let authority = rest.prefix { $0 != "/" && $0 != "?" && $0 != "#" }
        if let at = authority.lastIndex(of: "@") {
            masked += "***"
            rest = rest[at...]
        }
        if let query = rest.firstIndex(where: { $0 == "?" || $0 == "#" }) {
            return masked + rest[..<query] + String(rest[query]) + "***"
        }
        return masked + rest
    }
}
