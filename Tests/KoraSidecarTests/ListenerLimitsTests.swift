import Foundation
import HTTPTypes
import Hummingbird
import NIOConcurrencyHelpers
import NIOCore
import NIOEmbedded
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting

/// What the public listener holds for clients that are not Kora: no memory for unsigned bodies, no
/// connection kept after a refusal, and a bound on the bodies being received at once; and the
/// internal listener's bound on the proxied bodies it holds.
@Suite("Listener limits")
struct ListenerLimitsTests {
    @Test func theOpenFileLimitIsRaisedToTheHardOneAndASmallOneIsWarnedOf() async throws {
        // At a soft limit of 1024 (common in containers), below the default listeners' 3 × 1024
        // connections, a full listener spun an event loop on failing accepts.
        let config = try writeProcessConfig(directory: try temporaryDirectory(), receiverPort: try freePort())
        let raised = try SidecarProcess(config: config, launcher: ["/usr/bin/prlimit", "--nofile=300:4096"])
        _ = try await raised.running()
        let limits = try #require(raised.openFileLimits)
        #expect(limits == (4096, 4096), "\(limits)")
        #expect(!raised.log.contains { $0.contains("limit of open files") })
        raised.signal(SIGTERM)
        try await raised.expectCleanExit()
        // Even the hard limit is below what the listeners may hold: said at start.
        let small = try SidecarProcess(config: config, launcher: ["/usr/bin/prlimit", "--nofile=1024:1024"])
        _ = try await small.running()
        #expect(small.log.contains { $0.contains("The limit of open files is below what the listeners may hold") })
        small.signal(SIGTERM)
        try await small.expectCleanExit()
    }

    func directSidecar(
        configure: @Sendable @escaping (inout SidecarConfiguration) -> Void = { _ in }, _ body: @escaping @Sendable (RunningSidecar) async throws -> Void
    ) async throws {
        try await withReceiver(Receiver()) { port in
            var configuration = testConfiguration(services: [testService("app", target: .url("http://127.0.0.1:\(port)/events"))])
            configure(&configuration)
            var options = SidecarOptions()
            // A store of its own: the configuration's default file is shared by every test.
            options.store = InMemoryStore()
            try await withSidecar(configuration, options: options, body)
        }
    }

    @Test func anUnsignedRequestIsRefusedBeforeItsBodyIsReadAndItsConnectionClosed() async throws {
        try await directSidecar { sidecar in
            // Half a megabyte announced, a hundred bytes sent: the refusal does not wait for the rest.
            for signature in ["", "X-Signature-Algorithm: sha1\r\nX-Signature: 00\r\nX-Timestamp: 1\r\n"] {
                let connection = try RawConnection(port: sidecar.webhookPort, readTimeout: 30)
                connection.send("POST /webhooks/koraidv HTTP/1.1\r\nHost: x\r\nContent-Length: 500000\r\n\(signature)\r\n")
                connection.send(Array(repeating: 0x20, count: 100))
                let response = await connection.response()
                #expect(statusCode(of: response) == 401, "\(signature)")
                #expect(response.contains(signature.isEmpty ? "MISSING_SIGNATURE" : "UNSUPPORTED_ALGORITHM"))
                #expect(await connection.closedByPeer())
            }

            // A whole body whose signature does not hold: refused, and the connection is not kept.
            let body = TestEvent.body()
            let connection = try RawConnection(port: sidecar.webhookPort, readTimeout: 30)
            connection.send("POST /webhooks/koraidv HTTP/1.1\r\nHost: x\r\nContent-Length: \(body.count)\r\nX-Kora-Signature: \(String(repeating: "0", count: 64))\r\n\r\n")
            connection.send(body)
            let response = await connection.response()
            #expect(statusCode(of: response) == 401)
            #expect(response.contains("INVALID_SIGNATURE"))
            #expect(await connection.closedByPeer())
        }
    }

    @Test func aRequestToAnotherPathOrWithAnotherMethodClosesItsConnectionUnread() async throws {
        // The listener would cut the body off at its read deadline anyway: far past the client's wait.
        try await directSidecar(configure: { $0.webhooks.limits.readTimeoutSeconds = 300 }) { sidecar in
            // Half a megabyte announced, a hundred bytes sent: the refusal does not wait for the
            // rest, and the server does not go on reading it for the next request.
            for (head, status) in [("POST /elsewhere", 404), ("PUT /webhooks/koraidv", 405), ("POST /healthz", 405)] {
                let connection = try RawConnection(port: sidecar.webhookPort, readTimeout: 30)
                connection.send("\(head) HTTP/1.1\r\nHost: x\r\nContent-Length: 500000\r\n\r\n")
                connection.send(Array(repeating: 0x20, count: 100))
                let response = await connection.response()
                #expect(statusCode(of: response) == status, "\(head)")
                #expect(await connection.closedByPeer(), "\(head)")
            }
        }
    }

    @Test func aClientStillSendingARefusedBodyGetsTheAnswerNotAReset() async throws {
        try await directSidecar { sidecar in
            // 4 MiB announced and sent in one go, over the 1 MiB limit: the 413 comes at once, and
            // the connection lingers while the client finishes sending, instead of resetting it.
            let connection = try RawConnection(port: sidecar.webhookPort, readTimeout: 30)
            let size = 4 << 20
            connection.send("POST /webhooks/koraidv HTTP/1.1\r\nHost: x\r\nContent-Length: \(size)\r\nX-Kora-Signature: \(String(repeating: "0", count: 64))\r\n\r\n")
            let sentWhole = await offPool { connection.send([UInt8](repeating: 0x20, count: size)) }
            #expect(sentWhole)
            let response = await connection.response()
            #expect(statusCode(of: response) == 413)
            #expect(response.contains("PAYLOAD_TOO_LARGE"))
            // The answer ends with the connection's end, not with a reset that a client still
            // sending would get in its place.
            #expect(await offPool { connection.readEnd() } == .endOfStream)
        }
    }

    @Test func bodiesBeingReceivedAreBoundedAcrossConnectionsAndGivenBack() async throws {
        // 72 bodies of nearly 1 MiB each, none finished: past their first 64 KiB, more than the
        // listener's 64 MiB for bodies being received. The ones past it get 503 at once; the others
        // wait for their deadline.
        let held = 72
        let size = 1 << 20
        let refusals = NIOLockedValueBox(0)
        try await directSidecar(configure: { $0.webhooks.limits.readTimeoutSeconds = 20 * Sanitizer.slowdown }) { sidecar in
            let statuses = try await withThrowingTaskGroup(of: Int?.self) { group in
                for _ in 0..<held {
                    let connection = try RawConnection(port: sidecar.webhookPort, readTimeout: 60)
                    group.addTask {
                        await offPool {
                            connection.send(
                                "POST /webhooks/koraidv HTTP/1.1\r\nHost: x\r\nContent-Length: \(size)\r\nX-Kora-Signature: \(String(repeating: "0", count: 64))\r\n\r\n")
                            connection.send([UInt8](repeating: 0x20, count: size - 1))
                            let status = statusCode(of: connection.readResponse())
                            if status == 503 { refusals.withLockedValue { $0 += 1 } }
                            return status
                        }
                    }
                }
                // While the budget is spent, one of Kora's webhooks, a few kilobytes, is still taken.
                try await waitUntil("a body to be refused", timeout: .seconds(30)) { refusals.withLockedValue { $0 } > 0 }
                #expect(try await sendSigned(TestEvent.body(), to: sidecar).status == 200)
                return try await group.reduce(into: [Int?]()) { $0.append($1) }
            }
            #expect(statuses.contains(503), "\(statuses)")
            // Every other one was cut off by its deadline, unanswered or with 408.
            #expect(statuses.allSatisfy { $0 == 503 || $0 == 408 || $0 == nil }, "\(statuses)")

            // Every byte was given back: a body of nearly the whole limit is taken again.
            let large = TestEvent.body() + [UInt8](repeating: 0x20, count: 1_000_000)
            #expect(try await sendSigned(large, to: sidecar).status == 200)
        }
    }

    /// A sidecar whose webhook listener takes `maxConnections`, with idle time-outs ten minutes away.
    func fullListenerSidecar(maxConnections: Int, _ body: @escaping @Sendable (RunningSidecar) async throws -> Void) async throws {
        try await directSidecar(
            configure: {
                $0.webhooks.limits.maxConnections = maxConnections
                $0.webhooks.limits.idleTimeoutSeconds = 600
            }, body)
    }

    /// `GET /healthz` on `connection`: its status.
    func healthz(_ connection: RawConnection) async -> Int? {
        connection.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        return statusCode(of: await connection.response())
    }

    @Test func aFullListenerClosesTheConnectionsThatWaitLongestForARequest() async throws {
        // Four connections kept alive after a request fill a listener of four; their idle time-out
        // is ten minutes away. A fifth client gets in, and the connections that waited longest make
        // room; those in use since stay open.
        try await fullListenerSidecar(maxConnections: 4) { sidecar in
            var kept: [RawConnection] = []
            for _ in 0..<4 {
                let connection = try RawConnection(port: sidecar.webhookPort, readTimeout: 30)
                #expect(await healthz(connection) == 200)
                kept.append(connection)
            }
            let newcomer = try RawConnection(port: sidecar.webhookPort, readTimeout: 30)
            #expect(await healthz(newcomer) == 200)
            // The first was closed once it had waited the grace after the fourth opened; the second,
            // for the fifth.
            #expect(await kept[0].closedByPeer())
            #expect(await kept[1].closedByPeer())
            #expect(await healthz(kept[3]) == 200)
            #expect(await healthz(newcomer) == 200)
            // A connection in the middle of a request is never closed for room (its `100 Continue`
            // says the sidecar has read the head and waits for the body).
            kept[2].send(
                "POST /webhooks/koraidv HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nExpect: 100-continue\r\nX-Kora-Signature: \(String(repeating: "0", count: 64))\r\n\r\n")
            #expect(await kept[2].head().hasPrefix("HTTP/1.1 100"))
            let another = try RawConnection(port: sidecar.webhookPort, readTimeout: 30)
            #expect(await healthz(another) == 200)
            kept[2].send("0123456789")
            #expect(statusCode(of: await kept[2].response()) == 401)
        }
    }

    @Test func aListenerThatAcceptedSeveralAtOnceComesBackUnderItsLimit() async throws {
        // Three clients wait in the backlog of a full listener of two. When room is made, one read
        // of the listening socket accepts all three, four open for a limit of two: enough are
        // closed to take it back under the limit, so that a sixth client gets in too.
        try await fullListenerSidecar(maxConnections: 2) { sidecar in
            let kept = try (0..<2).map { _ in try RawConnection(port: sidecar.webhookPort, readTimeout: 30) }
            for connection in kept { #expect(await healthz(connection) == 200) }
            let waiting = try (0..<3).map { _ in try RawConnection(port: sidecar.webhookPort, readTimeout: 30) }
            for connection in waiting { connection.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") }
            for connection in waiting { #expect(statusCode(of: await connection.response()) == 200) }
            let last = try RawConnection(port: sidecar.webhookPort, readTimeout: 30)
            #expect(await healthz(last) == 200)
        }
    }

    @Test func aListenerFilledByRequestsMakesRoomOnceTheyAreAnswered() async throws {
        // Two proxied calls that Kora holds fill an internal listener of two; a third client waits
        // in the backlog. Once Kora answers, one of the two kept-alive connections makes room for
        // it, well before their idle time-out, ten minutes away.
        let answers = Gate()
        let kora = ScriptedKora([.answerWhenOpened(answers, 200, "{}"), .answerWhenOpened(answers, 200, "{}")])
        try await withScriptedKora(kora) { base in
            defer { answers.open() }
            var configuration = proxyConfiguration(koraBaseURL: base, services: [appService()])
            configuration.internal.limits.maxConnections = 2
            configuration.internal.limits.idleTimeoutSeconds = 600
            let logs = TestLogs()
            try await withProxySidecar(configuration, logs: logs) { sidecar in
                let call = "GET /api/v1/idv/verifications/ver_1 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \(ProxySecrets.appToken)\r\n\r\n"
                let held = try (0..<2).map { _ in try RawConnection(port: sidecar.internalPort, readTimeout: 30) }
                for connection in held { connection.send(call) }
                try await waitUntil("Kora to hold both calls") { kora.requests.count == 2 }
                let newcomer = try RawConnection(port: sidecar.internalPort, readTimeout: 30)
                newcomer.send("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                // Kora answers once the sidecar's look for room, one grace after the second
                // connection opened, has found both busy, so that the room below is made when an
                // answer is written (answering sooner, that look would make it).
                try await waitUntil("the listener to be full of requests") {
                    logs.all.contains { $0.contains("Listener full: every connection is in the middle of a request") }
                }
                answers.open()
                for connection in held { #expect(statusCode(of: await connection.response()) == 200) }
                #expect(statusCode(of: await newcomer.response()) == 200)
            }
        }
    }

    @Test func aBodyIsChargedPastItsFreeBytesHeldWhileInUseAndGivenBackOnEveryPath() async throws {
        // 64 KiB free, then chunks of 40 KiB, against a budget of 100 KiB.
        func request(chunks: Int) -> Request {
            let parts = [ByteBuffer(repeating: 0x41, count: BodyBudget.free)] + Array(repeating: ByteBuffer(repeating: 0x41, count: 40 << 10), count: chunks)
            let body = AsyncStream<ByteBuffer> { continuation in
                for part in parts { continuation.yield(part) }
                continuation.finish()
            }
            return Request(head: HTTPRequest(method: .post, scheme: "http", authority: "x", path: "/"), body: RequestBody(asyncSequence: body))
        }
        let budget = BodyBudget(bytes: 100 << 10)
        let channel = EmbeddedChannel()
        try await channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).get()
        // The third chunk is past the budget: refused, and the two taken are given back.
        await #expect(throws: SidecarHTTPError.self) {
            _ = try await BodyReader.hold(request(chunks: 3), channel: channel, limit: 1 << 20, budget: budget, logger: quietLogger)
        }
        // Two chunks fit and stay charged while the body is held, until given back.
        let held = try await BodyReader.hold(request(chunks: 2), channel: channel, limit: 1 << 20, budget: budget, logger: quietLogger)
        #expect(held.body.readableBytes == BodyBudget.free + (80 << 10))
        #expect(!budget.take((20 << 10) + 1))
        held.giveBack()
        #expect(budget.take(100 << 10))
    }

    @Test func proxiedBodiesAreBoundedUntilKoraAnswersAndGivenBack() async throws {
        // Uploads of 2 MiB, one after another, to a Kora that holds each: every one is held whole
        // until Kora answers, so past their first 64 KiB, 33 fit the internal listener's 64 MiB and
        // the 34th gets 503 without reaching Kora. Once Kora answers, every byte is back (the
        // refused upload's too): 33 fit again. (Fewer than the 64 connections the sidecar opens to
        // Kora, so that each held upload reaches Kora.)
        let size = 2 << 20
        let fit = (64 << 20) / (size - BodyBudget.free)
        let (first, second) = (Gate(), Gate())
        let kora = ScriptedKora(
            Array(repeating: .answerWhenOpened(first, 200, "{}"), count: fit) + Array(repeating: .answerWhenOpened(second, 200, "{}"), count: fit))
        try await withScriptedKora(kora) { base in
            defer { (first.open(), second.open()) }
            var configuration = proxyConfiguration(koraBaseURL: base, services: [appService()])
            configuration.internal.limits.maxBodyBytes = size
            configuration.kora.timeoutSeconds = 120 * Sanitizer.slowdown
            configuration.kora.retry.maxAttempts = 1
            try await withProxySidecar(configuration) { sidecar in
                let upload = "POST /api/v1/idv/documents HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \(ProxySecrets.appToken)\r\n"
                    + "Content-Type: application/octet-stream\r\nContent-Length: \(size)\r\n\r\n"
                /// Uploads until one is refused: the uploads Kora holds, and the refusal's status.
                func fill() async throws -> (held: [RawConnection], refusal: Int?) {
                    var held: [RawConnection] = []
                    let reached = kora.requests.count
                    while held.count <= fit {
                        let connection = try RawConnection(port: sidecar.internalPort, readTimeout: 60)
                        connection.send(upload)
                        connection.send([UInt8](repeating: 0x41, count: size))
                        // Held by Kora, or refused (answered at once; Kora never sees it).
                        try await waitUntil("the upload to reach Kora or be refused", timeout: .seconds(30)) {
                            kora.requests.count == reached + held.count + 1 || connection.hasBytesToRead
                        }
                        guard kora.requests.count == reached + held.count + 1 else { return (held, statusCode(of: await connection.response())) }
                        held.append(connection)
                    }
                    return (held, nil)
                }
                let once = try await fill()
                #expect(once.held.count == fit)
                #expect(once.refusal == 503)
                first.open()
                for connection in once.held { #expect(statusCode(of: await connection.response()) == 200) }
                #expect(try await metric(#"kora_sidecar_proxy_refused_total{code="UNAVAILABLE"}"#, in: sidecar) == 1)

                let again = try await fill()
                #expect(again.held.count == fit)
                #expect(again.refusal == 503)
                second.open()
            }
        }
    }
}
