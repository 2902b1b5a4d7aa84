import Foundation
import NIOCore
import NIOEmbedded
import NIOHTTP1
import NIOPosix
import NIOSSL
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting

/// Delivery's own HTTP/1.1 client, against services that misbehave at the connection level. The
/// redirects, time-outs and the answer cap are also covered end to end in "Delivery to services".
@Suite("Delivery client")
struct DeliveryClientTests {
    @Test func keptAliveConnectionsCarryTheNextDeliveriesAndAClosingAnswerEndsOne() async throws {
        let kept = try await ScriptedService { _, _ in .answer() }
        let closing = try await ScriptedService { _, _ in .answer(headers: [("Connection", "close")]) }
        let client = DeliveryClient()
        for _ in 0..<5 {
            #expect(try await deliver(with: client, to: "http://127.0.0.1:\(kept.port)/e").statusCode == 200)
            #expect(try await deliver(with: client, to: "http://127.0.0.1:\(closing.port)/e").statusCode == 200)
        }
        #expect(kept.connections == 1)
        #expect(kept.requests.count == 5)
        #expect(closing.connections == 5)
        // Concurrent deliveries each take a connection, then leave it to the next: never more
        // connections than deliveries at once.
        let pooled = try await ScriptedService { _, _ in .answer() }
        for _ in 0..<3 {
            await withTaskGroup(of: Void.self) { group in
                for _ in 0..<8 { group.addTask { _ = try? await deliver(with: client, to: "http://127.0.0.1:\(pooled.port)/e") } }
            }
        }
        #expect(pooled.requests.count == 24)
        #expect(pooled.connections <= 8)
        client.shutdown()
        #expect(try await deliver(with: client, to: "http://127.0.0.1:\(kept.port)/e").error == "the sidecar is stopping")
        // Shutting down closed the idle connections.
        try await waitUntil("the idle connections to close") { kept.closedConnections == 1 && pooled.closedConnections == pooled.connections }
        for service in [kept, closing, pooled] { await service.close() }
    }

    @Test func idleConnectionsBeyondTheCapCloseOnceDone() async throws {
        let service = try await ScriptedService { _, _ in .answerOnceReceived(4) }
        let client = DeliveryClient(maximumIdlePerEndpoint: 2)
        // Four at once, on four connections: two stay idle (for 55 s), the other two close.
        await withTaskGroup(of: Void.self) { group in
            for _ in 0..<4 { group.addTask { _ = try? await deliver(with: client, to: "http://127.0.0.1:\(service.port)/e") } }
        }
        #expect(service.requests.count == 4)
        #expect(service.connections == 4)
        try await waitUntil("two connections to close") { service.closedConnections == 2 }
        client.shutdown()
        try await waitUntil("shutting down to close the idle two") { service.closedConnections == 4 }
        await service.close()
    }

    @Test func anIdleConnectionClosesAfterTheIdleTimeOut() async throws {
        let service = try await ScriptedService { _, _ in .answer() }
        let client = DeliveryClient(idleTimeout: .milliseconds(200))
        #expect(try await deliver(with: client, to: "http://127.0.0.1:\(service.port)/e").statusCode == 200)
        try await waitUntil("the idle connection to close") { service.closedConnections == 1 }
        // The next delivery opens a new one.
        #expect(try await deliver(with: client, to: "http://127.0.0.1:\(service.port)/e").statusCode == 200)
        #expect(service.connections == 2)
        client.shutdown()
        await service.close()
    }

    @Test func aKeptAliveConnectionTheServiceClosedBeforeTheRequestWentOutIsLeftForANewOne() async throws {
        // The first connection's second request is cut off after its head: its body, larger than
        // what the kernels buffer, cannot all have been written.
        let service = try await ScriptedService { connection, request in
            connection == 0 && request == 1 ? .resetOnHead : .answer()
        }
        let client = DeliveryClient()
        let endpoint = try #require(DeliveryEndpoint(.url("http://127.0.0.1:\(service.port)/e")))
        #expect(try await client.post([:], body: Array("{}".utf8), to: endpoint, timeout: .seconds(10)).status == 200)
        let large = [UInt8](repeating: 0x61, count: 32 << 20)
        #expect(try await client.post([:], body: large, to: endpoint, timeout: .seconds(30)).status == 200)
        #expect(service.connections == 2)
        #expect(service.requests.map(\.connection) == [0, 1])
        #expect(service.requests.last?.body.count == large.count)
        client.shutdown()
        await service.close()
    }

    @Test func aConnectionClosedAfterTheRequestWentOutIsAFailedAttemptNotRetriedAtOnce() async throws {
        let closing = try await ScriptedService { _, _ in .closeWithoutAnswer }
        let closingKept = try await ScriptedService { _, request in request == 0 ? .answer() : .closeWithoutAnswer }
        let client = DeliveryClient()
        // A new connection, and a kept-alive one: the service may have acted on what it read.
        #expect(try await deliver(with: client, to: "http://127.0.0.1:\(closingKept.port)/e").statusCode == 200)
        for service in [closing, closingKept] {
            let unanswered = try await deliver(with: client, to: "http://127.0.0.1:\(service.port)/e")
            #expect(unanswered.statusCode == nil)
            #expect(unanswered.error == "connection closed by the other side")
            #expect(service.connections == 1)
        }
        client.shutdown()
        for service in [closing, closingKept] { await service.close() }
    }

    @Test func anAnswerWhoseBodyBreaksOffCountsByItsStatus() async throws {
        // The head says 200 and a body of 100 bytes, then the connection closes: the service took
        // the event, and counting the attempt as failed sent it again (a duplicate, at every retry).
        let cut = try await ScriptedService { _, request in request == 0 ? .answer() : .headThenClose }
        let client = DeliveryClient()
        #expect(try await deliver(with: client, to: "http://127.0.0.1:\(cut.port)/e").statusCode == 200)
        let halfAnswered = try await deliver(with: client, to: "http://127.0.0.1:\(cut.port)/e")
        #expect(halfAnswered.statusCode == 200)
        #expect(halfAnswered.error == nil)
        #expect(cut.requests.count == 2)
        // Its connection is not used again.
        #expect(try await deliver(with: client, to: "http://127.0.0.1:\(cut.port)/e").statusCode == 200)
        #expect(cut.connections == 2)
        client.shutdown()
        await cut.close()
    }

    @Test func aSwitchingProtocolsAnswerIsRefusedAndItsConnectionNotReused() async throws {
        let switching = try await ScriptedService { connection, _ in connection == 0 ? .answer(status: 101, headers: [("Upgrade", "x")]) : .answer() }
        let client = DeliveryClient()
        let refused = try await deliver(with: client, to: "http://127.0.0.1:\(switching.port)/e")
        #expect(refused.statusCode == nil)
        #expect(refused.error == "the answer was not HTTP/1.1")
        #expect(try await deliver(with: client, to: "http://127.0.0.1:\(switching.port)/e").statusCode == 200)
        #expect(switching.connections == 2)
        client.shutdown()
        await switching.close()
    }

    @Test func aCancelledDeliveryEndsAtOnceAndClosesItsConnection() async throws {
        let silent = try await ScriptedService { _, _ in .stall }
        let client = DeliveryClient()
        let delivery = Task { try await deliver(with: client, to: "http://127.0.0.1:\(silent.port)/e", timeoutSeconds: 600) }
        try await waitUntil("the request to arrive") { silent.requests.count == 1 }
        delivery.cancel()
        let result = try await delivery.value
        #expect(result.statusCode == nil)
        #expect(result.error == "cancelled before the answer")
        try await waitUntil("the connection to close") { silent.closedConnections == 1 }
        // Cancelled before it started: nothing is sent, and no connection is left open.
        let early = Task {
            withUnsafeCurrentTask { $0?.cancel() }
            return try await deliver(with: client, to: "http://127.0.0.1:\(silent.port)/e", timeoutSeconds: 600)
        }
        #expect(try await early.value.error == "cancelled before the answer")
        // Its connection was opened (connecting does not stop for a cancellation), then closed unused.
        try await waitUntil("the second connection to be closed") { silent.connections == 2 && silent.closedConnections == 2 }
        #expect(silent.requests.count == 1)
        client.shutdown()
        await silent.close()
    }

    @Test func aHeaderValueThatWouldSplitTheRequestIsNeverSent() async throws {
        let service = try await ScriptedService { _, _ in .answer() }
        var configuration = testService("app", target: .url("http://127.0.0.1:\(service.port)/e"))
        configuration.deliver?.headers = [("X-Api-Key", Secret("key\r\nX-Injected: 1"))]
        let event = try EventNormalizer.normalize(body: TestEvent.body(), webhookID: nil, receivedAt: .now())
        let result = await EventSender(client: DeliveryClient(), reportOnly: false)
            .send(event, to: DeliveryService(name: "app", deliver: configuration.deliver!), attempt: 1)
        #expect(result.statusCode == nil)
        #expect(result.error == "the request is not valid HTTP: check the service's headers and path")
        #expect(service.requests.isEmpty)
        await service.close()
    }

    @Test func aCancellationThatComesAfterItsExchangeLeavesTheConnectionToTheNext() throws {
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHTTPClientHandlers()
        let handler = DeliveryExchangeHandler(maximumAnswerBytes: 1024, idleTimeout: .seconds(55))
        try channel.pipeline.syncOperations.addHandler(handler)
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        let request = HTTPRequestHead(version: .http1_1, method: .POST, uri: "/e", headers: ["Host": "app", "Content-Length": "0"])
        func exchange(answer: String) throws -> EventLoopFuture<DeliveryExchangeHandler.Outcome> {
            let promise = channel.eventLoop.makePromise(of: DeliveryExchangeHandler.Outcome.self)
            handler.start(request, body: ByteBuffer(), deadline: .now() + .seconds(10), promise: promise)
            try channel.writeInbound(ByteBuffer(string: answer))
            return promise.futureResult
        }
        let first = channel.eventLoop.makePromise(of: DeliveryExchangeHandler.Outcome.self)
        handler.start(request, body: ByteBuffer(), deadline: .now() + .seconds(10), promise: first)
        try channel.writeInbound(ByteBuffer(string: "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
        #expect(try first.futureResult.wait().reusable)
        // The first task's cancellation arrives once its exchange is over: the next one is not its.
        handler.abandon(first)
        #expect(channel.isActive)
        #expect(try exchange(answer: "HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n").wait().answer.status == 202)
        // A cancellation that comes before its exchange starts: it never does, and the connection closes.
        let early = channel.eventLoop.makePromise(of: DeliveryExchangeHandler.Outcome.self)
        handler.abandon(early)
        handler.start(request, body: ByteBuffer(), deadline: .now() + .seconds(10), promise: early)
        #expect(throws: CancellationError.self) { try early.futureResult.wait() }
        #expect(!channel.isActive)
    }

    @Test func anAnswerWhoseBodyStallsCountsByItsStatusOnceTheTimeOutPasses() async throws {
        let stalling = try await ScriptedService { _, _ in .headThenStall }
        let client = DeliveryClient()
        // The head must arrive within the time-out for the status to count: 5 s, which a loaded machine
        // meets; the body never comes, so the attempt ends when it passes.
        let result = try await deliver(with: client, to: "http://127.0.0.1:\(stalling.port)/e", timeoutSeconds: 5)
        #expect(result.statusCode == 200, "\(result.error ?? "")")
        // Its connection is not reused: the next delivery opens another (answered, so the service has
        // counted that connection by now).
        let next = try await deliver(with: client, to: "http://127.0.0.1:\(stalling.port)/e", timeoutSeconds: 5)
        #expect(next.statusCode == 200, "\(next.error ?? "")")
        #expect(stalling.connections == 2)
        client.shutdown()
        await stalling.close()
    }

    @Test func httpsServicesAreVerifiedAgainstTheTrustRoots() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let (certificatePath, keyPath) = (directory + "/cert.pem", directory + "/key.pem")
        let openssl = try await runTool(
            "/usr/bin/openssl",
            [
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", keyPath, "-out", certificatePath, "-days", "1",
                "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
            ])
        try #require(openssl.status == 0, "\(openssl.stderr)")
        let certificate = try NIOSSLCertificate.fromPEMFile(certificatePath)
        let server = TLSConfiguration.makeServerConfiguration(
            certificateChain: certificate.map { .certificate($0) }, privateKey: .privateKey(try NIOSSLPrivateKey(file: keyPath, format: .pem)))
        let service = try await ScriptedService(tls: server) { _, _ in .answer() }
        var trusting = TLSConfiguration.makeClientConfiguration()
        trusting.trustRoots = .certificates(certificate)
        let trustingClient = DeliveryClient(tls: trusting)
        let systemClient = DeliveryClient()

        // An answer that ends where its connection does, closed without TLS's notice: its status holds.
        let untilClose = try await ScriptedService(tls: server) { _, _ in .answerUntilClose }
        let closing = try await deliver(with: trustingClient, to: "https://localhost:\(untilClose.port)/e")
        #expect(closing.statusCode == 200, "\(closing.error ?? "")")
        await untilClose.close()
        let plainUntilClose = try await ScriptedService { _, _ in .answerUntilClose }
        #expect(try await deliver(with: systemClient, to: "http://127.0.0.1:\(plainUntilClose.port)/e").statusCode == 200)
        await plainUntilClose.close()

        let delivered = try await deliver(with: trustingClient, to: "https://localhost:\(service.port)/e")
        #expect(delivered.statusCode == 200, "\(delivered.error ?? "")")
        #expect(try await deliver(with: trustingClient, to: "https://localhost:\(service.port)/e").statusCode == 200)
        #expect(service.connections == 1)
        // A certificate the system does not trust, or one for another name: nothing is sent.
        let untrusted = try await deliver(with: systemClient, to: "https://localhost:\(service.port)/e")
        #expect(untrusted.statusCode == nil)
        // The error says why in words, and names none of the build's files.
        #expect(untrusted.error?.hasPrefix("TLS handshake failed: the certificate did not verify") == true, "\(untrusted.error ?? "")")
        let otherName = try await deliver(with: trustingClient, to: "https://127.0.0.1:\(service.port)/e")
        #expect(otherName.error == "TLS handshake failed: the certificate is not for the URL's host name or IP address", "\(otherName.error ?? "")")
        #expect(service.requests.count == 2)
        trustingClient.shutdown()
        systemClient.shutdown()

        // Through the sidecar: a company's own authority, named by delivery.caFile, trusted besides the system's.
        var configuration = testConfiguration(services: [testService("app", target: .url("https://localhost:\(service.port)/e"))])
        configuration.delivery.caFile = certificatePath
        var options = SidecarOptions()
        options.store = InMemoryStore()
        try await withSidecar(configuration, options: options) { sidecar in
            #expect(try await sendSigned(TestEvent.body(), to: sidecar).status == 200)
            try await waitUntil("the delivery over TLS") { service.requests.count == 3 }
        }
        await service.close()
        configuration.delivery.caFile = directory + "/absent.pem"
        #expect {
            try buildApplication(configuration, logger: quietLogger, options: options)
        } throws: { "\($0)" == "The certificate file \(directory)/absent.pem (delivery.caFile) does not exist." }
    }

    @Test func aCertificateAuthorityAddedToTheCAFileIsTrustedWithoutARestart() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        // Two authorities of a company's, each a self-signed certificate for the service's name.
        func makeAuthority(_ name: String) async throws -> String {
            let made = try await runTool(
                "/usr/bin/openssl",
                [
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "\(directory)/\(name).key", "-out", "\(directory)/\(name).pem", "-days",
                    "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                ])
            try #require(made.status == 0, "\(made.stderr)")
            return try String(contentsOfFile: "\(directory)/\(name).pem", encoding: .utf8)
        }
        let (old, new) = (try await makeAuthority("old"), try await makeAuthority("new"))
        let caFile = directory + "/ca.pem"
        // Written whole and renamed over the file, as a bundle is renewed.
        @Sendable func writeCAFile(_ text: String) throws {
            try text.write(toFile: caFile + ".new", atomically: false, encoding: .utf8)
            try #require(rename(caFile + ".new", caFile) == 0)
        }
        try writeCAFile(old)
        let server = TLSConfiguration.makeServerConfiguration(
            certificateChain: try NIOSSLCertificate.fromPEMFile(directory + "/new.pem").map { .certificate($0) },
            privateKey: .privateKey(try NIOSSLPrivateKey(file: directory + "/new.key", format: .pem)))
        let service = try await ScriptedService(tls: server) { _, _ in .answer() }
        var configuration = DeliveryConfiguration()
        configuration.caFile = caFile
        let logs = TestLogs()
        let client = DeliveryClient(tls: try configuration.clientTLS(), caFile: caFile, logger: logs.logger())
        defer { client.shutdown() }

        let refused = try await deliver(with: client, to: "https://localhost:\(service.port)/e")
        #expect(refused.error?.hasPrefix("TLS handshake failed: the certificate did not verify") == true, "\(refused.error ?? "")")
        try writeCAFile(old + new)
        try await waitUntil("the new authority to be trusted") {
            try await deliver(with: client, to: "https://localhost:\(service.port)/e").statusCode == 200
        }
        #expect(logs.all.contains { $0.contains("delivery.caFile was read again") })
        // A bundle that cannot be read leaves the authorities read before: new connections still verify.
        @Sendable func deliverOnANewConnection() async throws -> AttemptResult {
            let another = try await ScriptedService(tls: server) { _, _ in .answer() }
            let result = try await deliver(with: client, to: "https://localhost:\(another.port)/e")
            await another.close()
            return result
        }
        try writeCAFile("not a certificate")
        try await waitUntil("the unusable bundle to be reported") {
            let result = try await deliverOnANewConnection()
            #expect(result.statusCode == 200, "\(result.error ?? "")")
            return logs.all.contains { $0.contains("delivery.caFile changed but cannot be used; the certificate authorities read before are still trusted") }
        }
        let after = try await deliverOnANewConnection()
        #expect(after.statusCode == 200, "\(after.error ?? "")")
        await service.close()
    }

    @Test func aServiceThatNeverAcceptsTheConnectionTimesOutConnecting() async throws {
        // A listener whose accept queue is full: the kernel drops further connection requests.
        let listener = try RawListener()
        listen(listener.fd, 0)
        var fillers: [Int32] = []
        defer { for fd in fillers { close(fd) } }
        for _ in 0..<3 {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_port = UInt16(listener.port).bigEndian
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            _ = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            fillers.append(fd)
        }
        let client = DeliveryClient()
        let result = try await deliver(with: client, to: "http://127.0.0.1:\(listener.port)/e", timeoutSeconds: 1)
        #expect(result.statusCode == nil)
        #expect(result.error == "connect timed out")
        client.shutdown()
    }

    @Test func aConnectionThatCouldNotBeMadeSaysWhy() async throws {
        // A host name that does not resolve (a resolver that finds nothing: a typo in deliver.url)
        // is not said to refuse the connection, which would send an operator to a service that is up.
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let unresolved = await #expect(throws: NIOConnectionError.self) {
            try await ClientBootstrap(group: loop).resolver(NoAddresses(loop: loop)).connect(host: "app.invalid", port: 80).get()
        }
        #expect(unresolved.map(HTTPClientFailure.describe) == "the host name did not resolve")
        #expect(unresolved.map(HTTPClientFailure.isOwnLimit) == false)
        // A port nobody listens on does refuse it.
        let port = try freePort()
        let refused = await #expect(throws: NIOConnectionError.self) {
            try await ClientBootstrap(group: loop).connect(host: "127.0.0.1", port: port).get()
        }
        #expect(refused.map(HTTPClientFailure.describe) == "connection refused")
    }

    @Test(arguments: [
        ("http://127.0.0.1:8080/events?x=1", "127.0.0.1:8080", "/events?x=1", nil),
        ("https://hooks.example.com", "hooks.example.com", "/", "hooks.example.com"),
        ("http://[::1]:81/a%20b", "[::1]:81", "/a%20b", nil),
        // TLS to an IP address: no server name (SNI carries host names only).
        ("https://10.0.0.1:8443/x", "10.0.0.1:8443", "/x", nil),
    ] as [(String, String, String, String?)])
    func urlsAreResolvedOnceIntoAnAddressATargetAndAHostHeader(url: String, host: String, target: String, serverName: String?) throws {
        let endpoint = try #require(DeliveryEndpoint(.url(url)))
        #expect(endpoint.hostHeader == host)
        #expect(endpoint.target == target)
        #expect(endpoint.serverName == serverName)
        #expect(endpoint.tls == url.hasPrefix("https:"))
        #expect(DeliveryEndpoint(.url("ftp://example.com/")) == nil)
        #expect(DeliveryEndpoint(.unixSocket(socketPath: "/run/app.sock", path: "/e"))?.hostHeader == "localhost")
    }

    /// The configuration's check of `deliver.url` and delivery's own reading of it agree: no service
    /// is accepted at start-up only to fail every delivery with an unusable URL.
    @Test(arguments: [
        "http://app:8080/a b", "http://app/x?q=a b", "HTTPS://App/", "http://[::1]:9/x", "http://app/ü",
        "ftp://app/", "http:///x", "app:8080/x", "http://", "",
    ])
    func everyURLTheConfigurationAcceptsHasAnEndpoint(url: String) {
        #expect((HTTPURL.problem(url) == nil) == (DeliveryEndpoint(.url(url)) != nil))
    }

    private func deliver(with client: DeliveryClient, to url: String, timeoutSeconds: Int = 10) async throws -> AttemptResult {
        var service = testService("app", target: .url(url))
        service.deliver?.timeoutSeconds = timeoutSeconds
        let event = try EventNormalizer.normalize(body: TestEvent.body(), webhookID: nil, receivedAt: .now())
        return await EventSender(client: client, reportOnly: false).send(event, to: DeliveryService(name: "app", deliver: service.deliver!), attempt: 1)
    }
}

/// A resolver that finds no address for any name, as DNS answers for a name that does not exist.
private struct NoAddresses: Resolver {
    struct NotFound: Error {}
    let loop: any EventLoop

    func initiateAQuery(host: String, port: Int) -> EventLoopFuture<[SocketAddress]> { loop.makeFailedFuture(NotFound()) }
    func initiateAAAAQuery(host: String, port: Int) -> EventLoopFuture<[SocketAddress]> { loop.makeFailedFuture(NotFound()) }
    func cancelQueries() {}
}
