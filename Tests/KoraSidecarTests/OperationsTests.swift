import AsyncHTTPClient
import Foundation
import NIOCore
import NIOSSL
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

/// Health, readiness, metrics and TLS (SPEC §5.3, `webhooks.tls`).
@Suite("Operations")
struct OperationsTests {
    @Test func metricsCountWebhooksDeliveriesAndTheOutbox() async throws {
        let receiver = Receiver { _, index in index == 0 ? .internalServerError : .ok }
        try await withReceiver(receiver) { (port: Int) async throws in
            let configuration = testConfiguration(services: [testService("app", target: .url("http://127.0.0.1:\(port)/e"))], mode: .queued)
            var options = SidecarOptions()
            options.store = InMemoryStore()
            options.retryPolicy = RetryPolicy(schedule: [.milliseconds(10)], jitter: 0)
            try await withSidecar(configuration, options: options) { (sidecar: RunningSidecar) async throws in
                let body = TestEvent.body(eventID: "evt_metrics")
                #expect(try await sendSigned(body, to: sidecar).status == 200)
                #expect(try await sendSigned(body, to: sidecar).status == 200)
                #expect(try await sendSigned(body, to: sidecar, secret: "whsec_wrong").status == 401)
                _ = try await receiver.waitFor(2)
                var text = ""
                try await waitUntil("the delivery to be counted") {
                    text = try await get(sidecar.internalURL("/metrics")).body
                    return text.contains(#"kora_sidecar_deliveries_total{service="app",result="delivered"} 1"#)
                }
                #expect(text.contains(#"kora_sidecar_webhooks_total{result="accepted"} 1"#))
                #expect(text.contains(#"kora_sidecar_webhooks_total{result="duplicate"} 1"#))
                #expect(text.contains(#"kora_sidecar_webhooks_total{result="INVALID_SIGNATURE"} 1"#))
                #expect(text.contains(#"kora_sidecar_deliveries_total{service="app",result="retry"} 1"#))
                #expect(text.contains(#"kora_sidecar_outbox_depth{service="app",state="delivered"} 1"#))
                #expect(text.contains(#"kora_sidecar_outbox_depth{service="app",state="pending"} 0"#))
                #expect(text.contains("kora_sidecar_delivery_duration_seconds_bucket"))
                #expect(text.contains("kora_sidecar_oldest_pending_age_seconds"))
                // Labels never carry ids or secrets.
                #expect(!text.contains("evt_metrics"))
                #expect(!text.contains(TestSecrets.webhook))
            }
        }
    }

    @Test func deliveriesPendingForAServiceNoLongerConfiguredAreSaidAndCounted() async throws {
        // A service renamed in the configuration: nothing sends what was pending for its old name.
        let store = InMemoryStore()
        let event = try EventNormalizer.normalize(body: TestEvent.body(), webhookID: nil, receivedAt: .now())
        _ = try await store.enqueue(event, services: ["billing"], at: .now(), dedupSince: .now())
        let logs = TestLogs()
        var options = SidecarOptions()
        options.store = store
        let configuration = testConfiguration(services: [testService("billing-v2", target: .url("http://127.0.0.1:9/e"))], mode: .queued)
        try await withSidecar(configuration, options: options, logs: logs) { (sidecar: RunningSidecar) async throws in
            try await waitUntil("the warning") { logs.all.contains { $0.contains("no longer has") && $0.contains("billing") } }
            let before = try await get(sidecar.internalURL("/metrics")).body
            #expect(before.contains(#"kora_sidecar_outbox_depth{service="billing",state="pending"} 1"#))
            #expect(before.contains(#"kora_sidecar_oldest_pending_age_seconds{service="billing"}"#))
            let verification = try #require(event.verificationID)
            let erased = try await post(sidecar.internalURL("/admin/erase"), body: Array(#"{"verificationId": "\#(verification)"}"#.utf8), headers: [])
            #expect(erased.status == 200)
            // Once none is pending, the old name's gauges read 0 instead of their last values.
            let after = try await get(sidecar.internalURL("/metrics")).body
            #expect(after.contains(#"kora_sidecar_outbox_depth{service="billing",state="pending"} 0"#))
            #expect(after.contains(#"kora_sidecar_oldest_pending_age_seconds{service="billing"} 0"#))
        }
    }

    @Test func healthAndReadinessOnTheInternalListener() async throws {
        var options = SidecarOptions()
        options.store = InMemoryStore()
        try await withSidecar(testConfiguration(), options: options) { (sidecar: RunningSidecar) async throws in
            #expect(try await get(sidecar.internalURL("/healthz")).json == ["status": "ok"])
            #expect(try await get(sidecar.internalURL("/readyz")).json == ["status": "ready"])
            let unknown = try await get(sidecar.internalURL("/nothing"))
            #expect(unknown.status == 404)
            #expect(unknown.code == "NOT_FOUND")
            // Every JSON answer, data and errors alike, is only ever read as JSON.
            for answer in [unknown, try await get(sidecar.internalURL("/admin/services"))] {
                #expect(answer.headers.first(name: "x-content-type-options") == "nosniff")
            }
        }
    }

    @Test func withoutAnAdminTokenAPageOfAnotherOriginCannotChangeAnything() async throws {
        // A bodyless POST is a "simple" request: any page an operator opened could send it to loopback.
        var options = SidecarOptions()
        options.store = InMemoryStore()
        try await withSidecar(testConfiguration(), options: options) { (sidecar: RunningSidecar) async throws in
            let retry = sidecar.internalURL("/admin/deliveries/retry?status=delivered")
            let own = sidecar.internalURL("")
            for headers in [[("Origin", "http://evil.example")], [("Origin", "http://127.0.0.1:3000")], [("Origin", "null")],
                [("Sec-Fetch-Site", "cross-site")], [("Sec-Fetch-Site", "same-site"), ("Origin", own)]]
            {
                let refused = try await post(retry, body: [], headers: headers)
                #expect(refused.status == 403, "\(headers)")
                #expect(refused.code == "FORBIDDEN")
            }
            // The console's own page, a script or curl; and reading stays open to any page, as before.
            for headers in [[("Origin", own), ("Sec-Fetch-Site", "same-origin")], [("Origin", own)], []] {
                #expect(try await post(retry, body: [], headers: headers).status == 200, "\(headers)")
            }
            #expect(try await get(sidecar.internalURL("/admin/services"), headers: [("Origin", "http://evil.example")]).status == 200)
            // The proxy as well: a page posting to loopback would create verifications as the service without a token.
            for path in ["/api/verifications", "/api/v1/idv/verifications"] {
                let refused = try await post(sidecar.internalURL(path), body: Array(#"{"userId":"u"}"#.utf8), headers: [("Origin", "http://evil.example")])
                #expect(refused.status == 403, "\(path)")
                #expect(refused.code == "FORBIDDEN")
            }
        }
    }

    @Test func aPageWhoseNameWasReboundToLoopbackReadsNothing() async throws {
        // DNS rebinding: attacker.example now resolves to 127.0.0.1, so the page's requests are
        // same-origin, and a browser sends no Origin on a GET and no Sec-Fetch-* to a plain-HTTP name.
        var configuration = testConfiguration()
        configuration.internal.allowedHosts = ["console.example.internal", "kora-sidecar"]
        configuration.services.append(ServiceConfiguration(name: "billing", token: Secret("billing-token")))
        var options = SidecarOptions()
        options.store = InMemoryStore()
        try await withSidecar(configuration, options: options) { (sidecar: RunningSidecar) async throws in
            let port = try #require(sidecar.internalPort)
            let rebound = [("Host", "attacker.example:\(port)")]
            for path in ["/admin/services", "/admin/deliveries?status=delivered", "/admin/", "/api/v1/idv/verifications/ver_1"] {
                let answer = try await get(sidecar.internalURL(path), headers: rebound)
                #expect(answer.status == 403, "\(path)")
                #expect(answer.code == "FORBIDDEN")
            }
            #expect(try await post(sidecar.internalURL("/admin/deliveries/retry?status=delivered"), body: [], headers: rebound).status == 403)
            // Health holds no data; a known token proves the caller is no page.
            #expect(try await get(sidecar.internalURL("/healthz"), headers: rebound).status == 200)
            let withToken = try await get(sidecar.internalURL("/admin/services"), headers: rebound + [("Authorization", "Bearer billing-token")])
            #expect(withToken.status == 200)
            // Admin answers may hold identity data: nothing on the way keeps a copy.
            #expect(withToken.headers["Cache-Control"] == ["no-store"])
            #expect(try await get(sidecar.internalURL("/admin/services"), headers: rebound + [("Authorization", "Bearer guessed")]).status == 403)
            // The tunnels' addresses and the names the operator listed; any other name, even one a
            // page could only choose on the same network (mDNS answers *.local, LLMNR one label), needs a token.
            for host in ["127.0.0.1:\(port)", "localhost:\(port)", "[::1]:\(port)", "Console.Example.Internal:\(port)", "localhost", "kora-sidecar.:\(port)"] {
                #expect(try await get(sidecar.internalURL("/admin/services"), headers: [("Host", host)]).status == 200, "\(host)")
            }
            for host in ["intranet:\(port)", "kora-sidecar.apps.svc.cluster.local:\(port)"] {
                let refused = try await get(sidecar.internalURL("/admin/services"), headers: [("Host", host)])
                #expect(refused.status == 403, "\(host)")
                #expect(refused.json?["error"]?.text?.contains("internal.allowedHosts") == true)
            }
        }
    }

    @Test func anEventWhoseIDNeedsEncodingIsReplayedByItsEncodedID() async throws {
        // A body with no id is known by its digest, `sha256:…`: the console encodes the colon, and the
        // route looked for the still-encoded id and answered 404.
        let receiver = Receiver()
        try await withReceiver(receiver) { (port: Int) async throws in
            var options = SidecarOptions()
            options.store = InMemoryStore()
            let configuration = testConfiguration(services: [testService("app", target: .url("http://127.0.0.1:\(port)/e"))], mode: .queued)
            try await withSidecar(configuration, options: options) { (sidecar: RunningSidecar) async throws in
                let body = Array(#"{"type":"verification.completed","data":{"verificationId":"ver_no_id","status":"approved"}}"#.utf8)
                #expect(try await sendSigned(body, to: sidecar).status == 200)
                _ = try await receiver.waitFor(1)
                var eventID = ""
                try await waitUntil("the delivery recorded as delivered") {
                    let listing = try await get(sidecar.internalURL("/admin/deliveries?status=delivered"))
                    guard case .array(let deliveries)? = listing.json?["deliveries"], let id = deliveries.first?["eventId"]?.text else { return false }
                    eventID = id
                    return true
                }
                #expect(eventID.hasPrefix("sha256:"))
                let replay = try await post(sidecar.internalURL("/admin/events/\(eventID.percentEncodingAllButUnreserved)/replay"), body: [], headers: [])
                #expect(replay.status == 200, "\(replay.body)")
                #expect(replay.json?["eventId"]?.text == eventID)
                _ = try await receiver.waitFor(2)
                let malformed = try await post(sidecar.internalURL("/admin/events/sha256%FF/replay"), body: [], headers: [])
                #expect(malformed.status == 404)
            }
        }
    }

    @Test func theWebhookListenerSpeaksTLSWhenConfigured() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let certificate = directory + "/cert.pem"
        let key = directory + "/key.pem"
        let openssl = try await runTool(
            "/usr/bin/openssl",
            ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", certificate, "-days", "1", "-subj", "/CN=localhost"])
        try #require(openssl.status == 0, "\(openssl.stderr)")

        var configuration = testConfiguration(services: [])
        configuration.webhooks.tls = TLSFiles(certificateFile: certificate, privateKeyFile: key)
        var options = SidecarOptions()
        options.store = InMemoryStore()
        try await withSidecar(configuration, options: options) { (sidecar: RunningSidecar) async throws in
            var tls = TLSConfiguration.makeClientConfiguration()
            tls.certificateVerification = .none
            tls.maximumTLSVersion = .tlsv11
            let client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: .init(tlsConfiguration: tls))
            var modern = TLSConfiguration.makeClientConfiguration()
            modern.certificateVerification = .none
            let modernClient = HTTPClient(eventLoopGroupProvider: .singleton, configuration: .init(tlsConfiguration: modern))
            // Shut down on every path: a client left running traps in its deinit, and takes every other test with it.
            defer {
                client.shutdown(queue: .global()) { _ in }
                modernClient.shutdown(queue: .global()) { _ in }
            }
            let body = TestEvent.body()
            var request = HTTPClientRequest(url: "https://127.0.0.1:\(sidecar.webhookPort)/webhooks/koraidv")
            request.method = .POST
            for header in KoraSignature.headers(scheme: .timestamped, secret: Secret(TestSecrets.webhook), body: body, timestamp: UnixTime.now().seconds) {
                request.headers.add(name: header.name, value: header.value)
            }
            request.body = .bytes(ByteBuffer(bytes: body))
            let response = try await modernClient.execute(request, timeout: .seconds(10))
            #expect(response.status.code == 200)
            // TLS 1.1 and below are refused.
            await #expect(throws: (any Error).self) { try await client.execute(request, timeout: .seconds(10)) }
            // Plain HTTP on the TLS port gets no answer.
            let plain = try? await post(sidecar.webhookURL, body: body, headers: [], timeout: .seconds(5))
            #expect(plain?.status == nil)
        }

        configuration.webhooks.tls = TLSFiles(certificateFile: directory + "/absent.pem", privateKeyFile: key)
        #expect(throws: StartupError.self) { try buildApplication(configuration, logger: TestLogs().logger(), options: options) }
        // The key of another certificate: one sentence naming both keys, not a failure as the listener starts.
        let otherKey = directory + "/other-key.pem"
        let other = try await runTool(
            "/usr/bin/openssl",
            ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", otherKey, "-out", directory + "/other.pem", "-days", "1", "-subj", "/CN=localhost"])
        try #require(other.status == 0, "\(other.stderr)")
        configuration.webhooks.tls = TLSFiles(certificateFile: certificate, privateKeyFile: otherKey)
        #expect(
            throws: StartupError(
                "The private key \(otherKey) (webhooks.tls.privateKeyFile) cannot be used with the certificate \(certificate) (webhooks.tls.certificateFile): is it the certificate's key?")
        ) { try buildApplication(configuration, logger: TestLogs().logger(), options: options) }
    }

    @Test func theWebhookListenerServesARenewedCertificateWithoutARestart() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        // As a Kubernetes volume renews them: the files sit in a folder a link names, swapped at once.
        func makePair(_ name: String) async throws {
            try FileManager.default.createDirectory(atPath: directory + "/" + name, withIntermediateDirectories: true)
            let made = try await runTool(
                "/usr/bin/openssl",
                ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "\(directory)/\(name)/key.pem", "-out", "\(directory)/\(name)/cert.pem", "-days", "1", "-subj", "/CN=\(name)"])
            try #require(made.status == 0, "\(made.stderr)")
        }
        @Sendable func serve(_ name: String) throws {
            let link = directory + "/current.new"
            try? FileManager.default.removeItem(atPath: link)
            try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: name)
            try #require(rename(link, directory + "/current") == 0)
        }
        /// The common name of the certificate a new handshake gets.
        @Sendable func served(_ port: Int) async throws -> String? {
            let client = try await runTool("/usr/bin/timeout", ["10", "/usr/bin/openssl", "s_client", "-connect", "127.0.0.1:\(port)"])
            let subject = client.stdout.split(separator: "\n").first { $0.hasPrefix("subject=") }
            return subject.map { $0.replacingOccurrences(of: " ", with: "") }?.components(separatedBy: "CN=").last
        }
        for name in ["first", "second", "third"] { try await makePair(name) }
        // A renewal whose key is another certificate's.
        try FileManager.default.createDirectory(atPath: directory + "/mismatched", withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: directory + "/third/cert.pem", toPath: directory + "/mismatched/cert.pem")
        try FileManager.default.copyItem(atPath: directory + "/first/key.pem", toPath: directory + "/mismatched/key.pem")
        try serve("first")

        var configuration = testConfiguration(services: [])
        configuration.webhooks.tls = TLSFiles(certificateFile: directory + "/current/cert.pem", privateKeyFile: directory + "/current/key.pem")
        var options = SidecarOptions()
        options.store = InMemoryStore()
        let logs = TestLogs()
        try await withSidecar(configuration, options: options, logs: logs) { (sidecar: RunningSidecar) async throws in
            #expect(try await served(sidecar.webhookPort) == "first")
            try serve("second")
            try await waitUntil("the renewed certificate to be served, and said") {
                try await served(sidecar.webhookPort) == "second" && logs.all.contains { $0.contains("TLS certificate was read again") }
            }
            try serve("mismatched")
            // Handshakes look at the files: each one here still gets the certificate served before.
            try await waitUntil("the unusable renewal to be reported") {
                let name = try await served(sidecar.webhookPort)
                #expect(name == "second")
                return logs.all.contains { $0.contains("TLS certificate files changed but cannot be used; the previous certificate is still served") }
            }
            try serve("third")
            try await waitUntil("the next renewal to be served") { try await served(sidecar.webhookPort) == "third" }
        }
    }
}

@Suite("Proxy paths")
struct ProxyPathTests {
    // A fragment hid the rest of the path from Kora (and the query with it), after `allow` had matched the whole.
    @Test(arguments: [
        "/verifications/../alerts", "/verifications/./x", "/verifications//x", "/verifications/%2e%2e/alerts", "/v/%2F/x", "/v/%5C",
        "/verifications/ver_1#/images", "/verifications#", "/v/a b", "/v/\u{e9}", "/v/a\\b", "/v/a\"b", "/v/<x>", "/v/\u{7f}",
        // Path parameters: `..;` is `..` to servers that drop them before resolving.
        "/verifications/..;/alerts/al_1/resolve", "/verifications/ver_1;x/images",
    ])
    func pathsThatCouldEscapeAnAllowPatternAreRefused(path: String) {
        #expect(!KoraProxy.isPlain(path))
    }

    @Test(arguments: ["/verifications", "/verifications/", "/verifications/ver_1/images", "/subjects/user%20x/verifications", "/a/b:c@d!$&'()*+,=-._~", "/subjects/a%3Bb/verifications", "/subjects/auth0|abc/verifications", "/v/[x]^{y}"])
    func plainPathsPass(path: String) {
        #expect(KoraProxy.isPlain(path))
    }
}
