import KoraSidecarCore
import Logging

/// `onlyOwnVerifications` on the proxy: a service that receives only the events of verifications it
/// created sees only those verifications through the proxy too, so that services sharing a sidecar
/// cannot read, complete or review each other's.
extension KoraProxy {
    /// Calls whose answers show any service's verifications (a person's list, fraud alerts), with any
    /// method.
    static let showingOthersVerifications = ["* /subjects", "* /subjects/**", "* /alerts", "* /alerts/**"].compactMap(AllowPattern.init)

    /// Refuses, when `caller` sees only its own verifications, a call (`path` relative to the Kora
    /// base) on a verification it did not create, with 404 whether another service created it or
    /// nobody knows (one answer, which does not say that it exists), and a call that shows other
    /// services' verifications, with 403. What is refused never reaches Kora.
    func checkOwnVerifications(_ caller: ServiceIdentity.Caller, method: String, path: String) async throws {
        guard caller.onlyOwnVerifications else { return }
        let log: Logger.Metadata = ["service": "\(caller.name)", "kora.method": "\(method)", "kora.path": "\(LoggedPath.masking(path))"]
        // Read as a server routing without regard to case would (`/Subjects`, `/Verifications`).
        let path = Self.resourceLowercased(path)
        if Self.showingOthersVerifications.contains(where: { $0.matches(method: method, path: path) }) {
            logger.notice("Kora API call refused: it shows other services' verifications", metadata: log)
            metrics.proxyCallRefused("FORBIDDEN")
            throw SidecarHTTPError(
                .forbidden, code: "FORBIDDEN",
                message: "Service \(caller.name) has onlyOwnVerifications, which forbids calls that show other services' verifications.")
        }
        guard let id = Self.verificationID(inPath: path) else { return }
        let origin: String?
        do {
            origin = try await origins.origin(of: id)
        } catch {
            logger.error("Store unavailable", metadata: log.merging(["error": "\(error)"]) { $1 })
            throw SidecarHTTPError.storeUnavailable()
        }
        guard origin == caller.name else {
            logger.notice("Kora API call refused: not a verification this service created", metadata: log)
            metrics.proxyCallRefused("NOT_FOUND")
            throw SidecarHTTPError(.notFound, code: "NOT_FOUND", message: "Service \(caller.name) created no verification with this id.")
        }
    }

    /// `path` with its first segment, the resource's name, in lower case.
    static func resourceLowercased(_ path: String) -> String {
        let segments = path.split(separator: "/", maxSplits: 2, omittingEmptySubsequences: false)
        guard segments.count >= 2 else { return path }
        return ([segments[0], Substring(segments[1].lowercased())] + segments.dropFirst(2)).joined(separator: "/")
    }

    /// The verification a call on `/verifications/{id}` or below is about.
    static func verificationID(inPath path: String) -> String? {
        let segments = path.split(separator: "/")
        guard segments.count >= 2, segments[0] == "verifications" else { return nil }
        return String(segments[1])
    }
}
