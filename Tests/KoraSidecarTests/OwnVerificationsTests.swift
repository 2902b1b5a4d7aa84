import NIOConcurrencyHelpers
import NIOHTTP1
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

/// `onlyOwnVerifications` through the API proxy: services sharing one sidecar, each seeing only the
/// verifications it created. Real listeners, a scripted Kora behind them.
@Suite("Only own verifications through the proxy")
struct OwnVerificationsTests {
    /// Everything a service that works on its verifications calls, and the lists it must not see.
    static let allow = [
        "POST /verifications", "GET /verifications/*", "POST /verifications/*/**", "GET /verifications/*/**", "GET /subjects/*/verifications",
        "GET /alerts", "POST /alerts/*/resolve", "GET /document-types",
    ]

    /// A service with its own token and `allow`, receiving only its own verifications' events.
    static func own(_ name: String, allow: [String]? = allow) -> ServiceConfiguration {
        var service = testService(name, target: .url("http://127.0.0.1:9/events"))
        service.token = Secret("\(name)-token")
        service.allow = allow
        service.deliver?.onlyOwnVerifications = true
        return service
    }

    static func sdk(_ sidecar: ProxySidecar, _ name: String, base: String = "/api/v1/idv") -> SDKStyleClient {
        SDKStyleClient(baseURL: sidecar.internalURL(base), apiKey: "\(name)-token")
    }

    @Test func aServiceCannotReadCompleteOrReviewAnotherServicesVerification() async throws {
        // Only allow was checked: alpha could read, complete and approve beta's verification.
        let kora = ScriptedKora([.answer(201, [], #"{"id":"ver_beta","status":"pending"}"#)])
        try await withScriptedKora(kora) { base in
            let configuration = proxyConfiguration(
                koraBaseURL: base,
                services: [Self.own("alpha"), Self.own("beta"), Self.own("gamma", allow: nil), appService(name: "audit", token: "audit-token")])
            try await withProxySidecar(configuration) { sidecar in
                let alpha = Self.sdk(sidecar, "alpha")
                let beta = Self.sdk(sidecar, "beta")
                #expect(try await beta.createVerification(externalID: "user-1").json?["id"] == "ver_beta")

                let review: JSONValue = ["decision": "approve"]
                let refused = [
                    try await alpha.call(.GET, "/verifications/ver_beta"),
                    try await alpha.call(.POST, "/verifications/ver_beta/complete"),
                    try await alpha.call(.POST, "/verifications/ver_beta/review", json: review, headers: [("X-Reviewer-ID", "rev-1")]),
                    try await alpha.call(.GET, "/verifications/ver_beta/report"),
                    try await Self.sdk(sidecar, "alpha", base: "/api/v1").call(.POST, "/verifications/ver_beta/review", json: review),
                    // One nobody is known to have created: the same answer, so that it says nothing of beta's.
                    try await alpha.call(.GET, "/verifications/ver_made_elsewhere"),
                    // Spelt as servers that route without regard to case read it, by a service no allow list limits.
                    try await Self.sdk(sidecar, "gamma").call(.POST, "/Verifications/ver_beta/complete"),
                ]
                #expect(refused.map(\.status) == Array(repeating: 404, count: refused.count))
                #expect(refused.allSatisfy { $0.code == "NOT_FOUND" })
                #expect(Set(refused.dropLast().map(\.body)).count == 1)
                #expect(!refused[0].body.contains("beta"))
                for (method, path, caller) in [
                    (HTTPMethod.GET, "/subjects/user-1/verifications", alpha), (.GET, "/alerts", alpha), (.POST, "/alerts/alert_1/resolve", alpha),
                    (.GET, "/Subjects/user-1/verifications", Self.sdk(sidecar, "gamma")), (.GET, "/ALERTS", Self.sdk(sidecar, "gamma")),
                ] {
                    let answer = try await caller.call(method, path)
                    #expect(answer.status == 403, "\(method) \(path)")
                    #expect(answer.code == "FORBIDDEN")
                    #expect(answer.json?["error"]?.text?.contains("onlyOwnVerifications") == true)
                }
                // Escaped letters, which servers that decode before routing read as letters, are refused outright.
                for path in ["/%76erifications/ver_beta", "/%73ubjects/user-1/verifications", "/verifications/ver%5Fbeta"] {
                    let answer = try await alpha.call(.GET, path)
                    #expect(answer.status == 400 && answer.code == "INVALID_PATH", "\(path)")
                }
                // Kora saw nothing of them: only beta's create.
                #expect(kora.requests.map(\.method) == ["POST"])

                // Beta works on its own; alpha still reads what is no service's; a service without
                // onlyOwnVerifications reads everything.
                #expect(try await beta.call(.GET, "/verifications/ver_beta").status == 200)
                #expect(try await beta.call(.POST, "/verifications/ver_beta/review", json: review).status == 200)
                #expect(try await alpha.call(.GET, "/document-types").status == 200)
                let audit = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: "audit-token")
                for path in ["/verifications/ver_beta", "/subjects/user-1/verifications", "/alerts"] {
                    #expect(try await audit.call(.GET, path).status == 200, "\(path)")
                }
                #expect(kora.requests.map { "\($0.method) \($0.path)" } == [
                    "POST /api/v1/idv/verifications", "GET /api/v1/idv/verifications/ver_beta", "POST /api/v1/idv/verifications/ver_beta/review",
                    "GET /api/v1/idv/document-types", "GET /api/v1/idv/verifications/ver_beta", "GET /api/v1/idv/subjects/user-1/verifications",
                    "GET /api/v1/idv/alerts",
                ])
            }
        }
    }

    @Test func anOriginTheStoreCannotLookUpIs503AndNothingIsSent() async throws {
        let kora = ScriptedKora([.answer(201, [], #"{"id":"ver_beta","status":"pending"}"#)])
        let store = InMemoryStore()
        try await withScriptedKora(kora) { base in
            let configuration = proxyConfiguration(koraBaseURL: base, services: [Self.own("beta")])
            var options = SidecarOptions()
            options.store = store
            try await withProxySidecar(configuration, options: options) { sidecar in
                let beta = Self.sdk(sidecar, "beta")
                #expect(try await beta.createVerification(externalID: "user-2").status == 201)
                store.failOriginLookups(with: SQLiteError(code: 5, message: "database is locked"))
                let answer = try await beta.call(.POST, "/verifications/ver_beta/complete")
                store.failOriginLookups(with: nil)
                #expect(answer.status == 503)
                #expect(answer.code == "UNAVAILABLE")
                #expect(kora.requests.count == 1)
                #expect(try await beta.call(.POST, "/verifications/ver_beta/complete").status == 200)
            }
        }
    }
}
