import Foundation
import NIOConcurrencyHelpers
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

/// Verification creation that is safe to repeat (`Idempotency-Key`), through real listeners with
/// the simulator or a scripted Kora behind them.
@Suite("Idempotent creation")
struct IdempotencyTests {
    @Test func aRepeatGetsTheFirstAnswerFromAnyReplicaAndAnotherBodyIsRefused() async throws {
        let store = InMemoryStore()
        try await withSimulator { simulator, base in
            var options = SidecarOptions()
            options.store = store
            let configuration = proxyConfiguration(koraBaseURL: base, services: [appService()])
            let key = [("Idempotency-Key", "signup-\(TestSecrets.unique)")]
            let first = try await withProxy(configuration, options) { sdk in
                try await sdk.call(.POST, "/verifications", json: ["externalId": "user-42", "tier": "basic"], headers: key)
            }
            #expect(first.status == 201)
            // Another replica sharing the store answers the repeat without calling Kora.
            let (repeated, other) = try await withProxy(configuration, options) { sdk in
                (
                    try await sdk.call(.POST, "/verifications", json: ["externalId": "user-42", "tier": "basic"], headers: key),
                    try await sdk.call(.POST, "/verifications", json: ["externalId": "user-43", "tier": "basic"], headers: key)
                )
            }
            #expect(repeated.status == 201)
            #expect(repeated.json?["id"] == first.json?["id"])
            #expect(other.status == 422)
            #expect(other.code == "IDEMPOTENCY_KEY_REUSED")
            let id = try #require(first.json?["id"]?.text)
            #expect(simulator.verification(id) != nil)
            #expect(try await simulatorCount(base) == 1)
        }
    }

    @Test func aRepeatAfterATimeOutFindsTheVerificationTheFirstCallCreated() async throws {
        let now = UnixTime.now().iso8601Seconds
        let kora = ScriptedKora([
            .stall,
            .answer(200, [], #"{"verifications":[{"id":"ver_made_by_the_first_call","externalId":"user-7","createdAt":"\#(now)"}]}"#),
        ])
        try await withScriptedKora(kora) { base in
            // The one test of a create that timed out: the same time-out bounds the repeat's lookup, so it is
            // long enough for a loaded machine to answer that in time (the first call stalls through it).
            let (first, repeated) = try await createThenRepeat(kora, base: base, externalID: "user-7", key: "k-1", timeoutSeconds: 10)
            #expect(first.status == 504)
            #expect(repeated.status == 201)
            #expect(repeated.json?["id"] == "ver_made_by_the_first_call")
            // The repeat asked which verifications exist; it did not create a second one.
            #expect(kora.requests.map { "\($0.method) \($0.path)" } == ["POST /api/v1/idv/verifications", "GET /api/v1/idv/subjects/user-7/verifications"])
        }
    }

    @Test func twoRepeatsAfterAnUnknownOutcomeSendTheCreateAgainOnce() async throws {
        // Both repeats used to look, find nothing, and send: two verifications for one key.
        let lookups = Gate()
        // The first create's connection closes unanswered: its outcome is unknown without waiting for a
        // time-out, which may then be long enough that the held lookup never runs into it.
        let kora = ScriptedKora([
            .close,
            .answerWhenOpened(lookups, 200, #"{"verifications":[]}"#),
            .answer(201, [], #"{"id":"ver_second_try","status":"pending"}"#),
        ])
        try await withScriptedKora(kora) { base in
            var configuration = proxyConfiguration(koraBaseURL: base, services: [appService()])
            configuration.kora.timeoutSeconds = 30
            configuration.kora.retry.maxAttempts = 1
            let (first, repeats) = try await withProxy(configuration, SidecarOptions()) { sdk in
                let key = [("Idempotency-Key", "k-twice")]
                let first = try await sdk.call(.POST, "/verifications", json: ["externalId": "user-8"], headers: key)
                async let one = sdk.call(.POST, "/verifications", json: ["externalId": "user-8"], headers: key)
                try await waitUntil("the first repeat's lookup") { kora.requests.count == 2 }
                async let other = sdk.call(.POST, "/verifications", json: ["externalId": "user-8"], headers: key)
                // The second repeat must wait for the first, not look for itself. Nothing shows that it is
                // waiting, so this only gives a second lookup the time to come (the test fails on it either
                // way): a margin a loaded machine needs, never a wait the test's passing depends on.
                try? await waitUntil("a second lookup", timeout: .seconds(5)) { kora.requests.count > 2 }
                lookups.open()
                return (first, try await [one, other])
            }
            #expect(first.status == 502)
            #expect(first.code == "KORA_UNREACHABLE")
            #expect(repeats.map(\.status) == [201, 201])
            #expect(repeats.map { $0.json?["id"]?.text } == ["ver_second_try", "ver_second_try"])
            #expect(kora.requests.map { "\($0.method) \($0.path)" } == [
                "POST /api/v1/idv/verifications", "GET /api/v1/idv/subjects/user-8/verifications", "POST /api/v1/idv/verifications",
            ])
        }
    }

    @Test func aRepeatDoesNotTakeTheVerificationAnotherServiceCreatedForThePerson() async throws {
        // The lookup lists by external id only: it took the other service's verification, and moved
        // its origin (and its events, with onlyOwnVerifications) to the service repeating.
        let now = UnixTime.now().iso8601Seconds
        let kora = ScriptedKora([
            .answer(201, [], #"{"id":"ver_other","status":"pending"}"#),
            .close,
            .answer(200, [], #"{"verifications":[{"id":"ver_other","externalId":"user-10","createdAt":"\#(now)"}]}"#),
            .answer(201, [], #"{"id":"ver_app","status":"pending"}"#),
        ])
        let store = InMemoryStore()
        try await withScriptedKora(kora) { base in
            var configuration = proxyConfiguration(
                koraBaseURL: base, services: [appService(), appService(name: "other", token: "token-other")])
            configuration.kora.timeoutSeconds = 30
            configuration.kora.retry.maxAttempts = 1
            var options = SidecarOptions()
            options.store = store
            let answers = NIOLockedValueBox<[HTTPAnswer]>([])
            try await withProxySidecar(configuration, options: options) { (sidecar: ProxySidecar) async throws in
                let other = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: "token-other")
                let created = try await other.call(.POST, "/verifications", json: ["externalId": "user-10"])
                #expect(created.status == 201)
                let app = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
                let key = [("Idempotency-Key", "k-other")]
                for _ in 0..<2 {
                    let answer = try await app.call(.POST, "/verifications", json: ["externalId": "user-10"], headers: key)
                    answers.withLockedValue { $0.append(answer) }
                }
            }
            let (first, repeated) = try answers.withLockedValue { answers in (try #require(answers.first), try #require(answers.last)) }
            #expect(first.status == 502)
            #expect(repeated.json?["id"] == "ver_app")
            #expect(try await store.origin(ofVerification: "ver_other") == "other")
            #expect(try await store.origin(ofVerification: "ver_app") == "app")
        }
    }

    @Test(arguments: ["own", "unlisted"])
    func aRepeatTakesAVerificationNoServiceCreatedOnlyIfTheCallerCouldListIt(caller: String) async throws {
        // The repeat took whatever verification of the person no service had created through the
        // sidecar, whatever the caller could see, and made the caller its origin.
        let service = caller == "own" ? OwnVerificationsTests.own("app") : appService(name: "app", token: "app-token", allow: ["POST /verifications"])
        let now = UnixTime.now().iso8601Seconds
        let kora = ScriptedKora([
            .close,
            .answer(200, [], #"{"verifications":[{"id":"ver_made_elsewhere","externalId":"user-3","createdAt":"\#(now)"}]}"#),
            .answer(201, [], #"{"id":"ver_app","status":"pending"}"#),
        ])
        let store = InMemoryStore()
        let answers = NIOLockedValueBox<[HTTPAnswer]>([])
        try await withScriptedKora(kora) { base in
            var configuration = proxyConfiguration(koraBaseURL: base, services: [service])
            configuration.kora.timeoutSeconds = 30
            configuration.kora.retry.maxAttempts = 1
            var options = SidecarOptions()
            options.store = store
            try await withProxySidecar(configuration, options: options) { sidecar in
                let app = OwnVerificationsTests.sdk(sidecar, "app")
                for _ in 0..<2 {
                    let answer = try await app.call(.POST, "/verifications", json: ["externalId": "user-3"], headers: [("Idempotency-Key", "k-1")])
                    answers.withLockedValue { $0.append(answer) }
                }
            }
        }
        #expect(answers.withLockedValue { $0.map(\.status) } == [502, 201])
        #expect(answers.withLockedValue { $0.last?.json?["id"] } == "ver_app")
        #expect(try await store.origin(ofVerification: "ver_made_elsewhere") == nil)
        #expect(try await store.origin(ofVerification: "ver_app") == "app")
    }

    @Test func aRepeatWhoseLookupFailsLeavesTheKeyToTheNextOne() async throws {
        // Taken over, then the lookup failed: the key stayed in flight with nobody sending it, and every
        // later repeat waited out the whole in-flight wait (minutes) before trying.
        let kora = ScriptedKora([.close, .answer(401, [], #"{"error":"Unauthorized"}"#)])
        let store = InMemoryStore()
        try await withScriptedKora(kora) { base in
            let (first, repeated) = try await createThenRepeat(kora, base: base, externalID: "user-11", key: "k-lookup", timeoutSeconds: 30, store: store)
            #expect(first.status == 502)
            #expect(repeated.code == "KORA_CREDENTIALS_REJECTED")
            #expect(try await store.idempotencyRecord(service: "app", key: "k-lookup")?.state == .unknown)
        }
    }

    @Test func aRepeatReadsKorasTimesInAnyRFC3339FormAndCreatesNothingOnAnAnswerItCannotRead() async throws {
        // Kora's createdAt with microseconds and an offset: the verification the first call created
        // was dropped as undated, and the repeat created a second one.
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(secondsFromGMT: 3600)
        formatter.dateFormat = "yyyy-MM-dd'T'HH:mm:ss.SSSSSSxxx"
        let createdAt = formatter.string(from: Date())
        for (lookup, expected) in [
            (ScriptedKora.Reply.answer(200, [], #"{"verifications":[{"id":"ver_first","createdAt":"\#(createdAt)"}]}"#), 201),
            (.answer(200, [], #"{"data":[{"id":"ver_first","created_at":"\#(createdAt)"}]}"#), 201),
            (.answer(200, [], #"{"verifications":[{"id":"ver_first","createdAt":"yesterday"}]}"#), 503),
            (.answer(200, [], #"{"items":"?"}"#), 503),
            (.answer(500, [], #"{"error":"Internal"}"#), 503),
        ] {
            // The first create's connection closes unanswered (its outcome unknown, no time-out waited for),
            // and the repeat's lookup has all the time a loaded machine needs.
            let kora = ScriptedKora([.close, lookup, .answer(201, [], #"{"id":"ver_second","status":"pending"}"#)])
            try await withScriptedKora(kora) { base in
                let (first, repeated) = try await createThenRepeat(kora, base: base, externalID: "user-12", key: "k-dated", timeoutSeconds: 30)
                #expect(first.status == 502)
                #expect(first.code == "KORA_UNREACHABLE")
                #expect(repeated.status == expected, "\(lookup)")
                if expected == 201 { #expect(repeated.json?["id"] == "ver_first") }
                #expect(kora.requests.count == 2, "the create was sent a second time after \(lookup)")
            }
        }
    }

    @Test func aCreateLeftInFlightByAKilledProcessIsTakenOverOnceItsTimeHasPassed() async throws {
        // The in-flight wait counted from each repeat's arrival, so after a kill every repeat waited
        // the whole wait (minutes with these settings) for a call nobody was sending.
        struct Hung: Error {}
        let kora = ScriptedKora([
            .answer(201, [], #"{"id":"ver_probe","status":"pending"}"#),
            .answer(200, [], #"{"verifications":[]}"#),
            .answer(201, [], #"{"id":"ver_after_the_kill","status":"pending"}"#),
        ])
        let store = InMemoryStore()
        try await withScriptedKora(kora) { base in
            var configuration = proxyConfiguration(koraBaseURL: base, services: [appService()])
            configuration.kora.timeoutSeconds = 120
            configuration.kora.retry.maxAttempts = 3
            var options = SidecarOptions()
            options.store = store
            let repeated = try await withProxy(configuration, options) { sdk in
                // The same body's digest, from a create that was answered.
                _ = try await sdk.call(.POST, "/verifications", json: ["externalId": "user-13"], headers: [("Idempotency-Key", "k-probe")])
                let digest = try #require(try await store.idempotencyRecord(service: "app", key: "k-probe")).digest
                // A process claimed "k-killed" a day ago and was killed before Kora answered.
                _ = try await store.claimIdempotencyKey(service: "app", key: "k-killed", digest: digest, at: UnixTime(milliseconds: UnixTime.now().milliseconds - 86_400_000))
                do {
                    return try await Deadline.run(after: .seconds(30), error: { Hung() }) {
                        try await sdk.call(.POST, "/verifications", json: ["externalId": "user-13"], headers: [("Idempotency-Key", "k-killed")])
                    }
                } catch {
                    // Lets the waiting repeat go, so that the sidecar can stop.
                    try await store.settleIdempotencyKey(service: "app", key: "k-killed", state: .unknown, at: .now())
                    throw error
                }
            }
            #expect(repeated.status == 201)
            #expect(repeated.json?["id"] == "ver_after_the_kill")
        }
    }

    @Test func koraRefusingForItsRateIsNotTheKeysAnswer() async throws {
        // Kora's 429 was kept as the key's answer for a day: every retry of the create got it again.
        let kora = ScriptedKora([
            .answer(429, [("Retry-After", "120")], #"{"code":"RATE_LIMIT_EXCEEDED"}"#),
            .answer(200, [], #"{"verifications":[]}"#),
            .answer(201, [], #"{"id":"ver_after_the_wait","status":"pending"}"#),
        ])
        try await withScriptedKora(kora) { base in
            let configuration = proxyConfiguration(koraBaseURL: base, services: [appService()])
            let (first, repeated) = try await withProxy(configuration, SidecarOptions()) { sdk in
                let key = [("Idempotency-Key", "k-limited")]
                return (
                    try await sdk.call(.POST, "/verifications", json: ["externalId": "user-9"], headers: key),
                    try await sdk.call(.POST, "/verifications", json: ["externalId": "user-9"], headers: key)
                )
            }
            #expect(first.status == 429)
            #expect(repeated.status == 201)
            #expect(repeated.json?["id"] == "ver_after_the_wait")
        }
    }

    /// Sends a create whose outcome stays unknown (Kora stalls it past `timeoutSeconds`, or closes its
    /// connection unanswered; one attempt), then its repeat under the same `key` (with `store`, or a
    /// fresh one), and lets a stalled call go; answers both.
    func createThenRepeat(
        _ kora: ScriptedKora, base: String, externalID: String, key: String, timeoutSeconds: Int, store: InMemoryStore? = nil
    ) async throws -> (first: HTTPAnswer, repeated: HTTPAnswer) {
        var configuration = proxyConfiguration(koraBaseURL: base, services: [appService()])
        configuration.kora.timeoutSeconds = timeoutSeconds
        configuration.kora.retry.maxAttempts = 1
        var options = SidecarOptions()
        options.store = store
        let answers = try await withProxy(configuration, options) { sdk in
            let headers = [("Idempotency-Key", key)]
            let body: JSONValue = ["externalId": .string(externalID)]
            return (
                try await sdk.call(.POST, "/verifications", json: body, headers: headers),
                try await sdk.call(.POST, "/verifications", json: body, headers: headers)
            )
        }
        kora.release()
        return (answers.0, answers.1)
    }

    /// Runs a sidecar for `body`, which gets an SDK-style client with the app's token.
    func withProxy<T: Sendable>(
        _ configuration: SidecarConfiguration, _ options: SidecarOptions, _ body: @Sendable @escaping (SDKStyleClient) async throws -> T
    ) async throws -> T {
        let result = NIOLockedValueBox<T?>(nil)
        try await withProxySidecar(configuration, options: options) { sidecar in
            let value = try await body(SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken))
            result.withLockedValue { $0 = value }
        }
        return try #require(result.withLockedValue { $0 })
    }

    /// How many verifications the simulator holds, through its own API.
    func simulatorCount(_ base: String) async throws -> Int {
        let answer = try await request(
            .GET, base + "/subjects/user-42/verifications", headers: [("Authorization", "Bearer k"), ("X-Tenant-ID", "t")])
        guard case .array(let list)? = answer.json?["verifications"] else { return -1 }
        return list.count
    }
}
