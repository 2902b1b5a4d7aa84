import AsyncHTTPClient
import Crypto
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import Testing

#if canImport(Glibc)
import Glibc

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator
#endif

/// The Kora API proxy of the internal listener (SPEC §5.1, §5.2), driven like an SDK would drive
/// it, against the simulator or a scripted Kora.
@Suite struct ProxyTests {
    // MARK: Forwarding

    @Test func sdkPointedAtTheSidecarWorksWithBothPathLayouts() async throws {
        try await withSimulator({ $0.apiKeys = [ProxySecrets.apiKey] }) { simulator, kora in
            try await withProxySidecar(proxyConfiguration(koraBaseURL: kora, services: [appService()])) { sidecar in
                let idvSDK = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
                let shortSDK = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1"), apiKey: ProxySecrets.appToken)

                let created = try await idvSDK.createVerification(externalID: "test-approve-sdk-1")
                #expect(created.status == 201)
                let id = try #require(created.json?["id"]?.text)
                let stored = try #require(simulator.verification(id))
                #expect(stored["tenantId"]?.text == ProxySecrets.tenant)
                #expect(stored["callbackUrl"]?.text == "https://hooks.example.com/webhooks/koraidv")

                let fetched = try await shortSDK.call(.GET, "/verifications/\(id)")
                #expect(fetched.status == 200)
                #expect(fetched.json?["externalId"]?.text == "test-approve-sdk-1")
                #expect(fetched.header("Content-Type") == "application/json")

                let listed = try await shortSDK.call(.GET, "/subjects/test-approve-sdk-1/verifications")
                guard case .array(let list)? = listed.json?["verifications"] else { throw TimedOut(what: "a list") }
                #expect(list.count == 1)

                let types = try await idvSDK.call(.GET, "/document-types?country=gb")
                #expect(types.json?["country"]?.text == "GB")

                let completed = try await idvSDK.call(.POST, "/verifications/\(id)/complete")
                #expect(completed.json?["status"]?.text == "verified")
            }
        }
    }

    @Test func callerCredentialsAreReplacedByTheSidecars() async throws {
        // Kora compressing though asked for no coding: the bytes pass unchanged, and so does their coding.
        let kora = ScriptedKora([.answer(200, [("Content-Encoding", "gzip")], "{}")])
        try await withScriptedKora(kora) { base in
            try await withProxySidecar(proxyConfiguration(koraBaseURL: base, services: [appService()])) { sidecar in
                let answer = try await request(
                    .PUT, sidecar.internalURL("/api/v1/idv/verifications/ver_1/metadata?a=1&b=two%20words"),
                    headers: [
                        ("Authorization", "Bearer \(ProxySecrets.appToken)"), ("X-Tenant-ID", "someone-else"), ("Cookie", "session=abc"),
                        ("Proxy-Authorization", "Basic eA=="), ("Connection", "close, X-Hop"), ("X-Hop", "1"), ("X-Request-Id", "req-7"),
                        ("Accept-Encoding", "gzip"), ("Proxy-Foo", "1"),
                    ],
                    body: Array(#"{"note":"kept"}"#.utf8))
                #expect(answer.status == 200)
                let seen = try #require(kora.requests.first)
                #expect(seen.method == "PUT")
                #expect(seen.path == "/api/v1/idv/verifications/ver_1/metadata")
                #expect(seen.query == "a=1&b=two%20words")
                #expect(seen.headers["authorization"] == ["Bearer \(ProxySecrets.apiKey)"])
                #expect(seen.headers["x-tenant-id"] == [ProxySecrets.tenant])
                #expect(seen.header("cookie") == nil)
                #expect(seen.header("proxy-authorization") == nil)
                #expect(seen.header("x-hop") == nil)
                #expect(seen.headers["accept-encoding"] == ["identity"])
                #expect(seen.header("proxy-foo") == nil)
                #expect(answer.header("content-encoding") == "gzip")
                #expect(seen.header("x-request-id") == "req-7")
                #expect(seen.body == Array(#"{"note":"kept"}"#.utf8))
            }
        }
    }

    @Test func createAddsTheCallbackURLOnlyWhenAbsent() async throws {
        let kora = ScriptedKora([
            .answer(201, [], #"{"id":"ver_a","status":"pending"}"#), .answer(201, [], #"{"id":"ver_b","status":"pending"}"#),
            .answer(201, [], #"{"id":"ver_c","status":"pending"}"#),
        ])
        try await withScriptedKora(kora) { base in
            try await withProxySidecar(proxyConfiguration(koraBaseURL: base, services: [appService()])) { sidecar in
                let sdk = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
                _ = try await sdk.createVerification(externalID: "u1", extra: [JSONMember("tier", "enhanced")])
                _ = try await sdk.createVerification(externalID: "u2", extra: [JSONMember("callbackUrl", "https://mine.example/cb")])
                // Kora reads `callbackUrl` only: a snake_case one would leave the verification without a callback.
                _ = try await sdk.createVerification(externalID: "u3", extra: [JSONMember("callback_url", "https://mine.example/cb")])
                let bodies = kora.requests.map { try? JSONParser.parse($0.body) }
                #expect(bodies[0]?["callbackUrl"]?.text == "https://hooks.example.com/webhooks/koraidv")
                #expect(bodies[0]?["tier"]?.text == "enhanced")
                #expect(bodies[1]?["callbackUrl"]?.text == "https://mine.example/cb")
                #expect(bodies[2]?["callbackUrl"]?.text == "https://hooks.example.com/webhooks/koraidv")
            }
        }
    }

    @Test func theCallbackURLIsAddedToTheCallersOwnBytesOrTheCreateIsRefused() async throws {
        let kora = ScriptedKora([.answer(201, [], #"{"id":"ver_a","status":"pending"}"#)])
        try await withScriptedKora(kora) { base in
            try await withProxySidecar(proxyConfiguration(koraBaseURL: base, services: [appService()])) { sidecar in
                let url = sidecar.internalURL("/api/v1/idv/verifications")
                let auth = [("Authorization", "Bearer \(ProxySecrets.appToken)"), ("Content-Type", "application/json")]
                // A lone surrogate (what JSON.stringify writes for one) and a number's exact text stay as sent.
                let body = #"{ "externalId": "u1", "expectedFirstName": "An\ud800n", "metadata": {"n": 1.50} }"#
                #expect(try await post(url, body: Array(body.utf8), headers: auth).status == 201)
                let sent = String(decoding: try #require(kora.requests.first).body, as: UTF8.self)
                #expect(sent == #"{ "externalId": "u1", "expectedFirstName": "An\ud800n", "metadata": {"n": 1.50} ,"callbackUrl":"https://hooks.example.com/webhooks/koraidv"}"#)
                let unreadable = try await post(url, body: Array("externalId=u2".utf8), headers: auth)
                #expect(unreadable.status == 400)
                #expect(unreadable.code == "INVALID_REQUEST")
                #expect(kora.requests.count == 1)
            }
        }
    }

    @Test func koraAnswersArePassedBackUnchanged() async throws {
        let kora = ScriptedKora([
            .answer(404, [("X-RateLimit-Limit", "50"), ("X-RateLimit-Remaining", "49"), ("X-RateLimit-Reset", "1800000060")], #"{"error":"Verification not found"}"#),
            .answer(422, [], #"{"message":"Validation failed","errors":[{"field":"externalId","message":"required"}]}"#),
        ])
        try await withScriptedKora(kora) { base in
            try await withProxySidecar(proxyConfiguration(koraBaseURL: base, services: [appService()])) { sidecar in
                let sdk = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
                let missing = try await sdk.call(.GET, "/verifications/ver_nope")
                #expect(missing.status == 404)
                #expect(missing.body == #"{"error":"Verification not found"}"#)
                #expect(missing.header("X-RateLimit-Limit") == "50")
                #expect(missing.header("X-RateLimit-Remaining") == "49")
                #expect(missing.header("X-RateLimit-Reset") == "1800000060")
                let invalid = try await sdk.createVerification(externalID: "")
                #expect(invalid.status == 422)
                #expect(invalid.body == #"{"message":"Validation failed","errors":[{"field":"externalId","message":"required"}]}"#)
                #expect(kora.requests.count == 2)
            }
        }
    }

    @Test func redirectsAreNotFollowed() async throws {
        let kora = ScriptedKora([.answer(302, [("Location", "/api/v1/idv/elsewhere")], "{}")])
        try await withScriptedKora(kora) { base in
            try await withProxySidecar(proxyConfiguration(koraBaseURL: base, services: [appService()])) { sidecar in
                let sdk = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
                let answer = try await sdk.call(.GET, "/verifications/ver_1/report")
                #expect(answer.status == 302)
                #expect(answer.header("Location") == "/api/v1/idv/elsewhere")
                #expect(kora.requests.map(\.path) == ["/api/v1/idv/verifications/ver_1/report"])
            }
        }
    }

    @Test func eightMegabyteSelfieIsStreamedToKoraIntact() async throws {
        try await withSimulator { simulator, kora in
            try await withProxySidecar(proxyConfiguration(koraBaseURL: kora, services: [appService()])) { sidecar in
                let sdk = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
                let id = try #require(try await sdk.createVerification(externalID: "test-approve-big").json?["id"]?.text)
                let image = Data((0..<(6 * 1024 * 1024)).map { UInt8(truncatingIfNeeded: $0 &* 31) }).base64EncodedString()
                #expect(image.utf8.count >= 8 * 1024 * 1024)
                let body = Array(#"{"imageBase64":""#.utf8) + Array(image.utf8) + Array(#""}"#.utf8)
                let answer = try await sdk.call(.POST, "/verifications/\(id)/selfie", raw: body)
                #expect(answer.status == 200)
                let upload = try #require(simulator.uploads(of: id)["selfie"])
                #expect(upload.bytes == image.utf8.count)
                #expect(upload.sha256 == Hex.encode(SHA256.hash(data: Array(image.utf8))))
            }
        }
    }

    @Test func complianceReportArrivesThroughTheProxyByteForByte() async throws {
        try await withSimulator { _, kora in
            try await withProxySidecar(proxyConfiguration(koraBaseURL: kora, services: [appService()])) { sidecar in
                let sdk = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
                let id = try #require(try await sdk.createVerification(externalID: "test-approve-report").json?["id"]?.text)
                #expect(try await sdk.call(.POST, "/verifications/\(id)/complete").status == 200)
                let direct = try await SDKStyleClient(baseURL: kora, apiKey: ProxySecrets.apiKey).call(.GET, "/verifications/\(id)/report")
                let proxied = try await sdk.call(.GET, "/verifications/\(id)/report")
                #expect(proxied.status == 200)
                #expect(proxied.header("Content-Type") == "application/pdf")
                #expect(proxied.header("Content-Disposition") == "attachment; filename=\"\(id)-report.pdf\"")
                // Longer than the proxy reads whole: it streamed the binary body through.
                #expect(direct.bytes.count > ProxyAnswer.bufferedAnswerBytes)
                #expect(proxied.bytes.count == direct.bytes.count)
                #expect(Hex.encode(SHA256.hash(data: proxied.bytes)) == Hex.encode(SHA256.hash(data: direct.bytes)))
            }
        }
    }

    @Test func theSimulatorsDefaultRateLimitIsLearnedButHoldsNoTestBack() async throws {
        try await withSimulator { _, kora in
            try await withProxySidecar(proxyConfiguration(koraBaseURL: kora, services: [appService()])) { sidecar in
                let sdk = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
                var answers: [HTTPAnswer] = []
                for _ in 0..<3 { answers.append(try await sdk.call(.GET, "/document-types?country=US")) }
                #expect(answers.map(\.status) == [200, 200, 200])
                #expect(answers.allSatisfy { $0.header("X-RateLimit-Limit") == "100000" })
                // The sidecar learned its budget from the stand-in's headers (the gauge is -1 while no
                // limit is known): far more than any test sends in a minute, where Kora's largest plan
                // (200) would have the sidecar hold, then refuse, a test's 201st call.
                let metrics = try await get(sidecar.internalURL("/metrics")).body
                let line = metrics.split(separator: "\n").first { $0.hasPrefix("kora_sidecar_kora_budget_remaining ") }
                let remaining = try #require(line.flatMap { Double($0.split(separator: " ").last ?? "") })
                #expect(remaining >= 99_997 && remaining < 100_000)
            }
        }
    }

    // MARK: Identity and allow lists

    @Test func unknownOrMissingTokenIsRefused() async throws {
        let kora = ScriptedKora()
        try await withScriptedKora(kora) { base in
            try await withProxySidecar(proxyConfiguration(koraBaseURL: base, services: [appService(), appService(name: "other", token: "other-token")])) {
                sidecar in
                for key in [nil, "wrong-token", ProxySecrets.appToken + "x", String(ProxySecrets.appToken.dropLast())] {
                    let sdk = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: key)
                    let answer = try await sdk.call(.GET, "/verifications/ver_1")
                    #expect(answer.status == 401)
                    #expect(answer.code == "UNAUTHORIZED")
                    #expect(!answer.body.contains(ProxySecrets.appToken))
                }
                let other = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: "other-token")
                #expect(try await other.call(.GET, "/verifications/ver_1").status == 200)
                #expect(kora.requests.count == 1)
                // Counted, so that a service locked out by a rotated token shows on a dashboard.
                let metrics = try await get(sidecar.internalURL("/metrics")).body
                #expect(metrics.contains(#"kora_sidecar_proxy_refused_total{code="UNAUTHORIZED"} 4"#))
            }
        }
    }

    @Test func aServiceWithoutTokenIsTheAnonymousCaller() async throws {
        let kora = ScriptedKora([.answer(201, [], #"{"id":"ver_anon"}"#)])
        let store = InMemoryStore()
        let options = { var options = SidecarOptions(); options.store = store; return options }()
        try await withScriptedKora(kora) { base in
            let configuration = proxyConfiguration(koraBaseURL: base, services: [appService(), appService(name: "legacy", token: nil)])
            try await withProxySidecar(configuration, options: options) { sidecar in
                let sdk = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: nil)
                let created = try await sdk.createVerification(externalID: "u")
                #expect(created.status == 201)
                let origin = try await store.origin(ofVerification: "ver_anon")
                #expect(origin == "legacy")
            }
        }
    }

    @Test func allowPatternsLimitWhatAServiceMayCall() async throws {
        let kora = ScriptedKora()
        try await withScriptedKora(kora) { base in
            let configuration = proxyConfiguration(
                koraBaseURL: base, services: [appService(allow: ["GET /verifications/*", "POST /verifications/*/complete"])])
            try await withProxySidecar(configuration) { sidecar in
                let sdk = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
                #expect(try await sdk.call(.GET, "/verifications/ver_1").status == 200)
                #expect(try await sdk.call(.POST, "/verifications/ver_1/complete").status == 200)
                for (method, path) in [(HTTPMethod.POST, "/verifications"), (.GET, "/verifications/ver_1/images"), (.DELETE, "/verifications/ver_1")] {
                    let answer = try await sdk.call(method, path)
                    #expect(answer.status == 403, "\(method) \(path)")
                    #expect(answer.code == "FORBIDDEN")
                }
                let shortcut = try await request(
                    .POST, sidecar.internalURL("/api/verifications"), headers: [("Authorization", "Bearer \(ProxySecrets.appToken)")],
                    body: Array(#"{"userId":"u"}"#.utf8))
                #expect(shortcut.status == 403)
                #expect(kora.requests.map(\.path) == ["/api/v1/idv/verifications/ver_1", "/api/v1/idv/verifications/ver_1/complete"])
            }
        }
    }

    @Test func aFragmentCannotCutThePathKoraSeesShortOfWhatAllowMatched() async throws {
        // The request line may carry a fragment: allowed as `…/*/images`, Kora got `/verifications/ver_1`.
        let kora = ScriptedKora()
        try await withScriptedKora(kora) { base in
            let configuration = proxyConfiguration(koraBaseURL: base, services: [appService(allow: ["GET /verifications/*/images"])])
            try await withProxySidecar(configuration) { sidecar in
                let connection = try RawConnection(port: sidecar.internalPort)
                connection.send(
                    "GET /api/v1/idv/verifications/ver_1#/images HTTP/1.1\r\nHost: localhost\r\n"
                        + "Authorization: Bearer \(ProxySecrets.appToken)\r\nConnection: close\r\n\r\n")
                let answer = await connection.response()
                #expect(answer.hasPrefix("HTTP/1.1 400"), "\(answer.prefix(200))")
                #expect(answer.contains("INVALID_PATH"))
                #expect(kora.requests.isEmpty)
            }
        }
    }

    @Test func theExternalIdInAPathNeverReachesTheLogs() async throws {
        // Kora unreachable, or a body over the limit: the path went into the warning, external id and all.
        let logs = TestLogs()
        var configuration = proxyConfiguration(koraBaseURL: "http://127.0.0.1:\(try refusingPort())", services: [appService()])
        configuration.internal.limits.maxBodyBytes = 1024
        try await withProxySidecar(configuration, logs: logs) { (sidecar: ProxySidecar) async throws in
            let sdk = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
            let unreachable = try await sdk.call(.GET, "/subjects/person-MARKER-7/verifications")
            #expect(unreachable.status == 502)
            let tooLarge = try await sdk.call(.POST, "/subjects/person-MARKER-8/verifications", raw: Array(repeating: UInt8(ascii: "a"), count: 4096))
            #expect(tooLarge.status == 413)
        }
        for line in ["Kora could not be reached", "Request body refused"] {
            #expect(logs.all.contains { $0.contains(line) && $0.contains("/subjects/{externalId}/verifications") }, "\(line)")
        }
        #expect(!logs.all.contains { $0.contains("MARKER") })
        #expect(LoggedPath.masking("/subjects/a/verifications/subjects") == "/subjects/{externalId}/verifications/subjects")
        // However the caller spelt it: the proxy forwards it as spelt.
        #expect(LoggedPath.masking("/Subjects/a/x/%73ubjects/b/SUBJECTS/c") == "/Subjects/{externalId}/x/%73ubjects/{externalId}/SUBJECTS/{externalId}")
    }

    @Test func charactersClientsSendUnencodedStillReachKora() async throws {
        // An Auth0-style external id, as `${base}/subjects/${id}/verifications` sends it.
        let kora = ScriptedKora()
        try await withScriptedKora(kora) { base in
            try await withProxySidecar(proxyConfiguration(koraBaseURL: base, services: [appService()])) { (sidecar: ProxySidecar) async throws in
                let sdk = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
                let answer = try await sdk.call(.GET, "/subjects/auth0|abc/verifications")
                #expect(answer.status == 200, "\(answer.body)")
            }
        }
        #expect(kora.requests.map(\.path).map { $0.removingPercentEncoding } == ["/api/v1/idv/subjects/auth0|abc/verifications"])
    }

    @Test func proxyWithoutKoraCredentialsAnswers503() async throws {
        var configuration = proxyConfiguration(koraBaseURL: "http://127.0.0.1:9/api/v1/idv", services: [appService()])
        configuration.kora.apiKey = nil
        try await withProxySidecar(configuration) { sidecar in
            let sdk = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
            let answer = try await sdk.call(.GET, "/verifications/ver_1")
            #expect(answer.status == 503)
            #expect(answer.code == "PROXY_NOT_CONFIGURED")
        }
    }

    @Test func bodyOverTheLimitIs413AndNeverReachesKora() async throws {
        let kora = ScriptedKora()
        try await withScriptedKora(kora) { base in
            var configuration = proxyConfiguration(koraBaseURL: base, services: [appService()])
            configuration.internal.limits.maxBodyBytes = 1024
            try await withProxySidecar(configuration) { sidecar in
                let sdk = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
                let answer = try await sdk.call(.POST, "/verifications/ver_1/selfie", raw: Array(repeating: UInt8(ascii: "a"), count: 4096))
                #expect(answer.status == 413)
                #expect(answer.code == "PAYLOAD_TOO_LARGE")
                #expect(kora.requests.isEmpty)
                #expect(try await metric(#"kora_sidecar_proxy_refused_total{code="PAYLOAD_TOO_LARGE"}"#, in: sidecar) == 1)
            }
        }
    }

    // MARK: Retries

    @Test func readsAreRetriedOn5xxWithExponentialBackoff() async throws {
        let kora = ScriptedKora([.answer(503, [], "{}"), .answer(502, [], "{}"), .answer(200, [], #"{"id":"ver_1"}"#)])
        let sleeper = SleepRecorder()
        try await withScriptedKora(kora) { base in
            try await withProxySidecar(proxyConfiguration(koraBaseURL: base, services: [appService()]), options: proxyOptions(sleeper)) { sidecar in
                let sdk = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
                let answer = try await sdk.call(.GET, "/verifications/ver_1")
                #expect(answer.status == 200)
                #expect(kora.requests.count == 3)
                let delays = sleeper.delays
                #expect(delays.count == 2)
                #expect((Duration.milliseconds(500)...Duration.milliseconds(1000)).contains(delays[0]))
                #expect((Duration.milliseconds(1000)...Duration.milliseconds(2000)).contains(delays[1]))
            }
        }
    }

    @Test func readsGiveUpAfterMaxAttemptsAndPassKorasAnswerBack() async throws {
        let kora = ScriptedKora([.answer(500, [], #"{"error":"a"}"#), .answer(500, [], #"{"error":"b"}"#), .answer(500, [], #"{"error":"c"}"#)])
        let sleeper = SleepRecorder()
        let logs = TestLogs()
        try await withScriptedKora(kora) { base in
            try await withProxySidecar(proxyConfiguration(koraBaseURL: base, services: [appService()]), options: proxyOptions(sleeper), logs: logs) { sidecar in
                let answer = try await SDKStyleClient(baseURL: sidecar.internalURL("/api/v1"), apiKey: ProxySecrets.appToken)
                    .call(.HEAD, "/verifications/ver_1")
                #expect(answer.status == 500)
                #expect(answer.header("content-length") == "\(#"{"error":"c"}"#.utf8.count)", "HEAD says the length Kora said")
                #expect(kora.requests.count == 3)
                #expect(sleeper.delays.count == 2)
            }
        }
        // An operator sees Kora failing at the default level, once for the call, not for each try.
        let failing = logs.all.filter { $0.hasPrefix("warning Kora answered with an error") }
        #expect(failing.count == 1)
        #expect(failing.first?.contains("kora.status=500") == true)
    }

    @Test func writesAreNotRetriedOn5xx() async throws {
        for method in [HTTPMethod.POST, .PUT, .PATCH, .DELETE] {
            let kora = ScriptedKora([.answer(503, [], #"{"error":"busy"}"#)])
            let sleeper = SleepRecorder()
            try await withScriptedKora(kora) { base in
                try await withProxySidecar(proxyConfiguration(koraBaseURL: base, services: [appService()]), options: proxyOptions(sleeper)) { sidecar in
                    let answer = try await SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
                        .call(method, "/verifications/ver_1/complete", json: [:])
                    #expect(answer.status == 503)
                    #expect(answer.body == #"{"error":"busy"}"#)
                    #expect(kora.requests.count == 1, "\(method)")
                    #expect(sleeper.delays.isEmpty)
                }
            }
        }
    }

    /// 101 was passed back: the service then waited on a connection that no longer spoke HTTP.
    @Test(arguments: [600, 101])
    func aStatusHTTPDoesNotDefineOrAnInterimOneIsNotPassedOn(status: Int) async throws {
        let kora = ScriptedKora([.answer(status, status == 101 ? [("Upgrade", "h2c"), ("Connection", "Upgrade")] : [], status == 101 ? "" : #"{"error":"odd"}"#)])
        try await withScriptedKora(kora) { base in
            try await withProxySidecar(proxyConfiguration(koraBaseURL: base, services: [appService()])) { sidecar in
                let answer = try await SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
                    .call(.GET, "/verifications/ver_1")
                #expect(answer.status == 502)
                #expect(answer.code == "KORA_UNREACHABLE")
            }
        }
    }

    @Test func aBodyKoraTricklesDoesNotHoldARetryOrARefusal() async throws {
        // The client's time-out covers the head only, and a byte every 100 ms never trips the read
        // time-out: reading such a body before retrying held the call until Kora stopped.
        let kora = ScriptedKora([.trickle(429, [("Retry-After", "0")]), .answer(200, [], #"{"id":"ver_1"}"#), .trickle(401, [])])
        try await withScriptedKora(kora) { base in
            try await withProxySidecar(proxyConfiguration(koraBaseURL: base, services: [appService()]), options: proxyOptions(SleepRecorder())) { sidecar in
                defer { kora.release() }
                let client = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
                for expected in [200, 502] {
                    let answer = NIOLockedValueBox<HTTPAnswer?>(nil)
                    let call = Task {
                        let got = try await client.call(.GET, "/verifications/ver_1")
                        answer.withLockedValue { $0 = got }
                    }
                    defer { call.cancel() }
                    try await waitUntil("the call to be answered while Kora still trickles") { answer.withLockedValue { $0 } != nil }
                    #expect(answer.withLockedValue { $0 }?.status == expected)
                }
                #expect(kora.requests.count == 3)
            }
        }
    }

    @Test func aCreateWhoseAnswerKoraTricklesEndsWithinTheTimeOut() async throws {
        // A create's answer is read whole (its id is recorded): a body Kora trickled held the call,
        // and the key's create in flight, as long as Kora liked.
        let kora = ScriptedKora([.trickle(201, [])])
        try await withScriptedKora(kora) { base in
            var configuration = proxyConfiguration(koraBaseURL: base, services: [appService()])
            // Long enough for the head to come in a loaded test process (else 504, a time-out of the
            // head, not of the body); the body's deadline is the same time-out after it.
            configuration.kora.timeoutSeconds = 5
            try await withProxySidecar(configuration) { sidecar in
                defer { kora.release() }
                let client = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
                let answer = NIOLockedValueBox<HTTPAnswer?>(nil)
                let call = Task {
                    let got = try await client.call(.POST, "/verifications", json: ["externalId": "user-slow", "tier": "basic"])
                    answer.withLockedValue { $0 = got }
                }
                defer { call.cancel() }
                try await waitUntil("the create to be answered while Kora still trickles", timeout: .seconds(30)) { answer.withLockedValue { $0 } != nil }
                #expect(answer.withLockedValue { $0 }?.status == 502)
            }
        }
    }

    @Test func anyMethodIsRetriedOn429HonouringRetryAfterSeconds() async throws {
        let kora = ScriptedKora([.answer(429, [("Retry-After", "7")], "{}"), .answer(201, [], #"{"id":"ver_9"}"#)])
        let sleeper = SleepRecorder()
        try await withScriptedKora(kora) { base in
            try await withProxySidecar(proxyConfiguration(koraBaseURL: base, services: [appService()]), options: proxyOptions(sleeper)) { sidecar in
                let answer = try await SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
                    .createVerification(externalID: "u")
                #expect(answer.status == 201)
                #expect(kora.requests.count == 2)
                #expect(kora.requests.map(\.body) == [kora.requests[0].body, kora.requests[0].body])
                #expect(sleeper.delays == [.seconds(7)])
            }
        }
    }

    @Test func retryAfterAsAnHTTPDateIsHonoured() async throws {
        // The date is written when Kora answers, as a real server would, not before the sidecar starts.
        let kora = ScriptedKora([.answerDated(429, "Retry-After", secondsAhead: 20), .answer(200, [], "{}")])
        let sleeper = SleepRecorder()
        try await withScriptedKora(kora) { base in
            try await withProxySidecar(proxyConfiguration(koraBaseURL: base, services: [appService()]), options: proxyOptions(sleeper)) { sidecar in
                let answer = try await SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
                    .call(.GET, "/alerts?status=open")
                #expect(answer.status == 200)
                let delay = try #require(sleeper.delays.first)
                #expect(delay > .seconds(15) && delay <= .seconds(20))
            }
        }
        #expect(RetryAfter.parse("Sun, 06 Nov 1994 08:49:37 GMT", now: UnixTime(milliseconds: 784_111_777_000 - 5000)) == .seconds(5))
        #expect(RetryAfter.parse("soon", now: .now()) == nil)
        #expect(RetryAfter.parse("Sun, 06 Nov 999999999 08:49:37 GMT", now: .now()) == nil)
        #expect(RetryAfter.parse("Sun, 06 Nov -2147483648 08:49:37 GMT", now: .now()) == nil)
        // The obsolete forms RFC 9110 has recipients read too (they were ignored, and the call retried
        // at once); an RFC 850 year more than 50 years ahead is the century before.
        let before = UnixTime(milliseconds: 784_111_777_000 - 5000)
        #expect(RetryAfter.parse("Sunday, 06-Nov-94 08:49:37 GMT", now: before) == .seconds(5))
        #expect(RetryAfter.parse("Sun Nov  6 08:49:37 1994", now: before) == .seconds(5))
        #expect(RetryAfter.parse("Thursday, 01-Jan-70 00:00:10 GMT", now: UnixTime(milliseconds: 0)) == .seconds(10))
        #expect(RetryAfter.parse("Tuesday, 01-Dec-26 06:12:21 GMT", now: UnixTime(milliseconds: 1_796_105_541_000 - 30_000)) == .seconds(30))
        #expect(RetryAfter.parse("Sun Nov  6 08:49:37 99999", now: .now()) == nil)
        // More seconds than ten digits hold: a very long wait, not none.
        #expect(RetryAfter.parse("99999999999", now: .now()) == .seconds(9_999_999_999))
    }

    @Test func retryAfterBeyondTheCapEndsTheRetriesAtOnce() async throws {
        let kora = ScriptedKora([.answer(429, [("Retry-After", "120")], #"{"code":"RATE_LIMIT_EXCEEDED"}"#)])
        let sleeper = SleepRecorder()
        try await withScriptedKora(kora) { base in
            try await withProxySidecar(proxyConfiguration(koraBaseURL: base, services: [appService()]), options: proxyOptions(sleeper)) { sidecar in
                let answer = try await SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
                    .call(.GET, "/verifications/ver_1")
                #expect(answer.status == 429)
                #expect(answer.header("Retry-After") == "120")
                #expect(kora.requests.count == 1)
                #expect(sleeper.delays.isEmpty)
            }
        }
    }

    @Test func aCallKoraWouldRefuseIsNotSentOnceKoraSaysTheBudgetIsSpent() async throws {
        let clock = ManualClock()
        let sleeper = SleepRecorder()
        try await withSimulator({
            $0.rateLimitPerMinute = 1
            $0.clock = { clock.read() }
        }) { _, kora in
            var configuration = proxyConfiguration(koraBaseURL: kora, services: [appService()])
            configuration.kora.retry.maxDelayMilliseconds = 60000
            try await withProxySidecar(configuration, options: proxyOptions(sleeper)) { sidecar in
                let sdk = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
                #expect(try await sdk.createVerification(externalID: "first").status == 201)
                // Kora answered X-RateLimit-Remaining: 0 with a reset beyond kora.rateLimit.maxWait:
                // the sidecar answers for Kora at once instead of sending a call Kora would refuse.
                let limited = try await sdk.createVerification(externalID: "second")
                #expect(limited.status == 429)
                #expect(limited.code == "RATE_LIMITED")
                #expect(limited.header("Retry-After").flatMap { Int64($0) }.map { $0 > 10 } == true)
                #expect(sleeper.delays.isEmpty)
            }
        }
    }

    @Test func aCallWaitsForKorasResetWithinMaxWaitAndThenSucceeds() async throws {
        let sleeper = SleepRecorder()
        try await withSimulator({
            $0.rateLimitPerMinute = 1
            $0.rateLimitWindowSeconds = 2
        }) { simulator, kora in
            var configuration = proxyConfiguration(koraBaseURL: kora, services: [appService()])
            configuration.kora.rateLimit.maxWait = .seconds(5)
            var options = proxyOptions(sleeper)
            options.koraProxy.budgetWindow = .seconds(2)
            try await withProxySidecar(configuration, options: options) { sidecar in
                let sdk = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
                #expect(try await sdk.createVerification(externalID: "first").status == 201)
                // Kora said none is left until its window resets (within 2 s): the call waits for it.
                let second = try await sdk.createVerification(externalID: "second")
                #expect(second.status == 201)
                #expect(sleeper.delays.isEmpty, "Kora never had to refuse a call")
                let id = try #require(second.json?["id"]?.text)
                #expect(simulator.verification(id)?["externalId"]?.text == "second")
            }
        }
    }

    @Test func anyMethodIsRetriedWhenTheConnectionFailedBeforeSending() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let socket = directory + "/kora.sock"
        let kora = ScriptedKora([.answer(201, [], #"{"id":"ver_late"}"#)])
        let bound = BoundPort()
        let started = Gate()
        let answered = Gate()
        // Kora comes up only while the proxy waits for its second attempt.
        let sleeper = SleepRecorder { _, _ in
            started.open()
            _ = try await bound.wait()
        }
        let base = "http+unix://\(percentEncoded(socket))/api/v1/idv"
        try await withProxySidecar(proxyConfiguration(koraBaseURL: base, services: [appService()]), options: proxyOptions(sleeper)) { sidecar in
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask {
                    await started.wait()
                    try await withServices([scriptedKoraApp(kora, unixSocket: socket, bound: bound)]) {
                        // Kora stays up until the caller has its answer.
                        await answered.wait()
                    }
                }
                let answer = try await SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
                    .createVerification(externalID: "u")
                answered.open()
                #expect(answer.status == 201)
                #expect(kora.requests.count == 1)
                #expect(sleeper.delays.count == 1)
                try await group.waitForAll()
            }
        }
    }

    @Test func aLostConnectionRetriesReadsButNeverAWriteThatMayHaveArrived() async throws {
        let kora = ScriptedKora([.close, .answer(200, [], #"{"id":"ver_1"}"#), .close])
        let sleeper = SleepRecorder()
        try await withScriptedKora(kora) { base in
            try await withProxySidecar(proxyConfiguration(koraBaseURL: base, services: [appService()]), options: proxyOptions(sleeper)) { sidecar in
                let sdk = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
                let read = try await sdk.call(.GET, "/verifications/ver_1")
                #expect(read.status == 200)
                #expect(kora.requests.count == 2)
                let write = try await sdk.createVerification(externalID: "once")
                #expect(write.status == 502)
                #expect(write.code == "KORA_UNREACHABLE")
                #expect(kora.requests.count == 3)
                #expect(kora.requests.filter { $0.method == "POST" }.count == 1)
            }
        }
    }

    @Test func unreachableKoraIs502AfterTheRetries() async throws {
        let sleeper = SleepRecorder()
        let base = "http+unix://\(percentEncoded("/tmp/ks-nothing-\(TestSecrets.unique).sock"))/api/v1/idv"
        try await withProxySidecar(proxyConfiguration(koraBaseURL: base, services: [appService()]), options: proxyOptions(sleeper)) { sidecar in
            let answer = try await SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
                .call(.GET, "/verifications/ver_1")
            #expect(answer.status == 502)
            #expect(answer.code == "KORA_UNREACHABLE")
            #expect(sleeper.delays.count == 2)
        }
    }

    @Test func slowKoraIs504AndNotRetried() async throws {
        let kora = ScriptedKora([.stall, .stall])
        let sleeper = SleepRecorder()
        try await withScriptedKora(kora) { base in
            defer { kora.release() }
            var configuration = proxyConfiguration(koraBaseURL: base, services: [appService()])
            // Long enough for the call to reach Kora on a loaded machine (at one second, a full run
            // once timed out connecting, and Kora never saw the call this test counts).
            configuration.kora.timeoutSeconds = 5 * Sanitizer.slowdown
            try await withProxySidecar(configuration, options: proxyOptions(sleeper)) { sidecar in
                let answer = try await SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
                    .call(.GET, "/verifications/ver_1")
                #expect(answer.status == 504)
                #expect(answer.code == "KORA_TIMEOUT")
                #expect(kora.requests.count == 1)
                #expect(sleeper.delays.isEmpty)
            }
        }
    }

    @Test func koraRejectingTheSidecarsKeyIs502AndLoggedWithoutTheKey() async throws {
        let logs = TestLogs()
        try await withSimulator({ $0.apiKeys = ["sk_sandbox_the_right_key"] }) { _, kora in
            try await withProxySidecar(proxyConfiguration(koraBaseURL: kora, services: [appService()]), logs: logs) { sidecar in
                let answer = try await SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
                    .createVerification(externalID: "u")
                #expect(answer.status == 502)
                #expect(answer.code == "KORA_CREDENTIALS_REJECTED")
                #expect(!answer.body.contains(ProxySecrets.apiKey))
            }
        }
        let forbidden = ScriptedKora([.answer(403, [], #"{"error":"Forbidden"}"#)])
        try await withScriptedKora(forbidden) { base in
            try await withProxySidecar(proxyConfiguration(koraBaseURL: base, services: [appService()]), logs: logs) { sidecar in
                let answer = try await SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
                    .call(.GET, "/alerts")
                #expect(answer.code == "KORA_CREDENTIALS_REJECTED")
            }
        }
        let loud = logs.all.filter { $0.hasPrefix("error") && $0.contains("Kora rejected the sidecar's own API key") }
        #expect(loud.count == 2)
        #expect(!logs.all.contains { $0.contains(ProxySecrets.apiKey) || $0.contains(ProxySecrets.appToken) })
    }

    // MARK: Shortcut and origins

    @Test func seedShortcutCreatesAVerification() async throws {
        try await withSimulator { simulator, kora in
            try await withProxySidecar(proxyConfiguration(koraBaseURL: kora, services: [appService()])) { sidecar in
                let auth = [("Authorization", "Bearer \(ProxySecrets.appToken)"), ("Content-Type", "application/json")]
                let created = try await request(
                    .POST, sidecar.internalURL("/api/verifications"), headers: auth, body: Array(#"{"userId":"user-42","tier":"enhanced"}"#.utf8))
                #expect(created.status == 200)
                guard case .object(let members)? = created.json else { throw TimedOut(what: "an object") }
                #expect(members.map(\.key) == ["verificationId"])
                let id = try #require(created.json?["verificationId"]?.text)
                let stored = try #require(simulator.verification(id))
                #expect(stored["externalId"]?.text == "user-42")
                #expect(stored["tier"]?.text == "enhanced")
                #expect(stored["callbackUrl"]?.text == "https://hooks.example.com/webhooks/koraidv")

                let standard = try await request(
                    .POST, sidecar.internalURL("/api/verifications"), headers: auth, body: Array(#"{"userId":"user-43"}"#.utf8))
                let other = try #require(standard.json?["verificationId"]?.text)
                #expect(simulator.verification(other)?["tier"]?.text == "standard")

                // An integer id, as mobile back ends have, and an empty tier, as the guide's server takes them.
                let numeric = try await request(
                    .POST, sidecar.internalURL("/api/verifications"), headers: auth, body: Array(#"{"userId":1234,"tier":""}"#.utf8))
                let numericID = try #require(numeric.json?["verificationId"]?.text)
                #expect(simulator.verification(numericID)?["externalId"]?.text == "1234")
                #expect(simulator.verification(numericID)?["tier"]?.text == "standard")

                for body in [#"{"tier":"basic"}"#, #"{"userId":""}"#, #"{"userId":1.5}"#, #"{"userId":true}"#] {
                    let invalid = try await request(.POST, sidecar.internalURL("/api/verifications"), headers: auth, body: Array(body.utf8))
                    #expect(invalid.status == 400, "\(body)")
                    #expect(invalid.code == "INVALID_REQUEST")
                }
                let unknown = try await request(.POST, sidecar.internalURL("/api/verifications"), body: Array(#"{"userId":"x"}"#.utf8))
                #expect(unknown.status == 401)
            }
        }
    }

    @Test func eventsReachOnlyTheServiceThatCreatedTheVerification() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let alpha = Receiver()
        let beta = Receiver()
        try await withReceiver(alpha) { alphaPort in
            try await withReceiver(beta) { betaPort in
                try await withSimulator { simulator, kora in
                    var services: [ServiceConfiguration] = []
                    for (name, port) in [("alpha", alphaPort), ("beta", betaPort)] {
                        var service = testService(name, target: .url("http://127.0.0.1:\(port)/events"))
                        service.token = Secret("\(name)-token")
                        service.deliver?.onlyOwnVerifications = true
                        services.append(service)
                    }
                    var configuration = proxyConfiguration(koraBaseURL: kora, services: services, mode: .queued)
                    configuration.storage.sqlitePath = directory + "/sidecar.sqlite"
                    configuration.kora.callbackURL = nil
                    var options = SidecarOptions()
                    options.retryPolicy = RetryPolicy(schedule: [.milliseconds(50)])
                    try await withProxySidecar(configuration, options: options, useSQLite: true) { sidecar in
                        simulator.setDashboardWebhookURL(sidecar.webhookURL)
                        var ids: [String: String] = [:]
                        for name in ["alpha", "beta"] {
                            let sdk = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: "\(name)-token")
                            let id = try #require(try await sdk.createVerification(externalID: "test-approve-\(name)").json?["id"]?.text)
                            ids[name] = id
                            #expect(try await sdk.call(.POST, "/verifications/\(id)/complete").status == 200)
                        }
                        // An approval is two events: verification.completed, then verification.verified.
                        let alphaGot = try await alpha.waitFor(2)
                        let betaGot = try await beta.waitFor(2)
                        #expect(alphaGot.map { $0.json?["verification"]?["id"]?.text } == [ids["alpha"], ids["alpha"]])
                        #expect(betaGot.map { $0.json?["verification"]?["id"]?.text } == [ids["beta"], ids["beta"]])
                    }
                    let reopened = try SQLiteStore(path: configuration.storage.sqlitePath, protection: .sealedForTests)
                    defer { reopened.close() }
                    let origins = try await simulator.sent.all.map(\.verificationID).asyncMap { try await reopened.origin(ofVerification: $0) }
                    #expect(Set(origins.compactMap { $0 }) == ["alpha", "beta"])
                }
            }
        }
        #expect(alpha.count == 2 && beta.count == 2)
    }

    @Test func anOriginTheStoreCouldNotTakeStillRoutesTheVerificationsEvents() async throws {
        let app = Receiver()
        let other = Receiver()
        try await withReceiver(app) { appPort in
            try await withReceiver(other) { otherPort in
                try await withSimulator { simulator, kora in
                    var own = testService("app", target: .url("http://127.0.0.1:\(appPort)/events"))
                    own.token = Secret("app-token")
                    own.deliver?.onlyOwnVerifications = true
                    // Takes every event: with the origin lost, the verification's events went here only.
                    var everything = testService("audit", target: .url("http://127.0.0.1:\(otherPort)/events"))
                    everything.token = Secret("audit-token")
                    var configuration = proxyConfiguration(koraBaseURL: kora, services: [own, everything], mode: .queued)
                    configuration.kora.callbackURL = nil
                    let store = InMemoryStore()
                    var options = SidecarOptions()
                    options.store = store
                    let logs = TestLogs()
                    try await withProxySidecar(configuration, options: options, logs: logs) { sidecar in
                        simulator.setDashboardWebhookURL(sidecar.webhookURL)
                        let sdk = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: "app-token")
                        // The store fails while the verification is created: Kora has it, the service gets its 201.
                        store.failWrites(with: SQLiteError(code: 5, message: "database is locked"))
                        let created = try await sdk.createVerification(externalID: "test-approve-origin")
                        store.failWrites(with: nil)
                        #expect(created.status == 201)
                        let id = try #require(created.json?["id"]?.text)
                        #expect(try await sdk.call(.POST, "/verifications/\(id)/complete").status == 200)
                        let got = try await app.waitFor(2)
                        #expect(got.map { $0.json?["verification"]?["id"]?.text } == [id, id])
                        try await waitUntil("the origin written after all") { try await store.origin(ofVerification: id) == "app" }
                        #expect(logs.all.contains { $0.contains("could not be stored yet") && $0.contains("verification.id=\(id)") })
                    }
                }
            }
        }
    }

    // MARK: Unix socket

    @Test func internalListenerOnAUnixSocketReplacesAStaleFileButNotALiveOne() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let socket = directory + "/api.sock"
        try leaveStaleSocket(at: socket)
        #expect(FileManager.default.fileExists(atPath: socket))

        let kora = ScriptedKora()
        try await withScriptedKora(kora) { base in
            let configuration = {
                var configuration = proxyConfiguration(koraBaseURL: base, services: [appService()])
                configuration.internal.listen = .unixSocket(path: socket)
                return configuration
            }()
            try await withProxySidecar(configuration) { _ in
                let mode = try FileManager.default.attributesOfItem(atPath: socket)[.posixPermissions] as? Int
                #expect(mode == 0o660)
                let sdk = SDKStyleClient(baseURL: "http+unix://\(percentEncoded(socket))/api/v1/idv", apiKey: ProxySecrets.appToken)
                #expect(try await sdk.call(.GET, "/verifications/ver_unix").status == 200)
                #expect(kora.requests.first?.path == "/api/v1/idv/verifications/ver_unix")

                #expect(throws: StartupError.self) {
                    _ = try buildApplication(configuration, logger: quietLogger, options: { var o = SidecarOptions(); o.store = InMemoryStore(); return o }())
                }
                #expect(UnixSocketFile.isAnswering(socket))
            }
        }
        let notASocket = directory + "/plain"
        #expect(FileManager.default.createFile(atPath: notASocket, contents: Data("x".utf8)))
        #expect(throws: StartupError.self) { try UnixSocketFile.replaceIfStale(notASocket, key: "internal.listen.unixSocket") }
        // A folder that is not there is one sentence naming the key, not an I/O error from the bind.
        let missing = directory + "/absent/internal.sock"
        #expect(throws: StartupError("The folder \(directory)/absent of \(missing) (internal.listen.unixSocket) does not exist or cannot be written; create it or choose another path.")) {
            try UnixSocketFile.replaceIfStale(missing, key: "internal.listen.unixSocket")
        }
    }
}

/// Binds a Unix socket at `path` and closes it without removing the file: what a crashed run leaves.
func leaveStaleSocket(at path: String) throws {
    let descriptor = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(descriptor) }
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: Array(path.utf8)) }
    let result = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    guard result == 0 else { throw TimedOut(what: "binding a socket") }
}

extension Sequence {
    fileprivate func asyncMap<T>(_ transform: (Element) async throws -> T) async rethrows -> [T] {
        var results: [T] = []
        for element in self { results.append(try await transform(element)) }
        return results
    }
}

/// A port of 127.0.0.1 that refuses every connection for the whole test run: a Kora that cannot be
/// reached. A socket bound to it (without `SO_REUSEADDR`) holds it and never listens, so no other
/// listener can take it, as one could take a port ``freePort()`` found free before the test called it.
func refusingPort() throws -> Int { try RefusingPort.bound.get() }

private enum RefusingPort {
    /// Bound once; the descriptor stays open until the test process ends.
    static let bound: Result<Int, ToolFailed> = {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return .failure(ToolFailed(description: "socket() failed")) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
        }
        guard bound else {
            close(fd)
            return .failure(ToolFailed(description: "bind() failed"))
        }
        return .success(Int(UInt16(bigEndian: address.sin_port)))
    }()
}
