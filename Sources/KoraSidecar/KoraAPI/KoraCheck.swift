import AsyncHTTPClient
import KoraSidecarCore
import NIOCore

/// The go-live check (`check-kora`): can this sidecar reach Kora, and does Kora accept its key
/// and tenant? One line per question, never the key.
package enum KoraCheck {
    /// What the check found: the lines to print, and whether everything is fine.
    package struct Report: Sendable {
        package var lines: [String]
        package var passed: Bool
    }

    /// Calls `GET /health` (no credentials), then a cheap authenticated read, `GET /document-types?country=US`.
    package static func run(_ kora: KoraConfiguration) async -> Report {
        let client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: KoraClient.clientConfiguration(timeoutSeconds: kora.timeoutSeconds))
        let report = await run(kora, client: client)
        try? await client.shutdown()
        return report
    }

    private static func run(_ kora: KoraConfiguration, client: HTTPClient) async -> Report {
        var lines: [String] = []
        let health = kora.apiBaseURL + "/health"
        switch await status(of: HTTPClientRequest(url: health), client: client, timeoutSeconds: kora.timeoutSeconds) {
        case .failure(let reason):
            return Report(lines: ["reachable: no (\(reason) from \(health))"], passed: false)
        case .success(let answer):
            lines.append("reachable: yes (\(answer.status) from \(health))")
        }
        guard let key = kora.apiKey, let tenant = kora.tenantId else {
            lines.append("key: not configured (set kora.apiKey and kora.tenantId, or KORAIDV_API_KEY and KORAIDV_TENANT_ID)")
            return Report(lines: lines, passed: false)
        }
        var request = HTTPClientRequest(url: kora.apiBaseURL + "/document-types?country=US")
        request.headers.add(name: "Authorization", value: "Bearer \(key.value)")
        request.headers.add(name: "X-Tenant-ID", value: tenant.value)
        request.headers.add(name: "Accept", value: "application/json")
        switch await status(of: request, client: client, timeoutSeconds: kora.timeoutSeconds) {
        case .failure(let reason):
            lines.append("key: unknown (\(reason))")
            return Report(lines: lines, passed: false)
        case .success(let answer):
            let passed = (200..<300).contains(answer.status)
            switch answer.status {
            case 200..<300: lines += ["key: accepted", "tenant: accepted"]
            case 401: lines += ["key: refused (401): check kora.apiKey", "tenant: not checked"]
            case 403: lines += ["key: accepted", "tenant: refused (403): check kora.tenantId"]
            case 400: lines += ["key: accepted", "tenant: refused (400): check kora.tenantId"]
            default: lines += ["key: unknown (Kora answered \(answer.status))", "tenant: not checked"]
            }
            lines.append("round trip: \(answer.milliseconds) ms")
            return Report(lines: lines, passed: passed)
        }
    }

    private struct Answer: Sendable {
        var status: Int
        var milliseconds: Int
    }

    private enum Outcome: Sendable {
        case success(Answer)
        case failure(String)
    }

    private static func status(of request: HTTPClientRequest, client: HTTPClient, timeoutSeconds: Int) async -> Outcome {
        let started = ContinuousClock.now
        do {
            let response = try await client.execute(request, timeout: .seconds(Int64(timeoutSeconds)))
            _ = try? await response.body.collect(upTo: 1 << 20)
            return .success(Answer(status: Int(response.status.code), milliseconds: Int((ContinuousClock.now - started).milliseconds)))
        } catch {
            return .failure(HTTPClientFailure.describe(error))
        }
    }
}
