import Foundation
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

/// Hostile clients against the real binary. Every scenario ends with the sidecar still serving a
/// valid webhook, its memory back near where it started, and not one 500.
@Suite("Abuse of the real binary", .serialized)
struct AbuseTests {
    /// How far the resident set may grow from the first run of a scenario to the end of the second:
    /// 16 MB. glibc's malloc keeps what the first run took (2,000 idle connections: about 30 MB over a
    /// 50 MB baseline, measured) and reuses it, so a sidecar that frees what an attacker opened or
    /// sent stays flat; one that kept it would grow by about as much again.
    static let slackKilobytes = 16 * 1024

    /// Starts the binary, serves one valid webhook, runs `scenario` (which returns every status it
    /// saw) twice, then checks the sidecar's health as above.
    func abuse(webhooks: String? = nil, _ scenario: @escaping @Sendable (RunningSidecar, Receiver) async throws -> [Int]) async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try await withChildSidecar(directory: directory, webhooks: webhooks) { child, sidecar, receiver in
            try await expectServesAValidWebhook(sidecar, receiver)
            var statuses = try await scenario(sidecar, receiver)
            try await expectServesAValidWebhook(sidecar, receiver)
            let afterFirst = child.residentKilobytes
            statuses += try await scenario(sidecar, receiver)
            #expect(!statuses.isEmpty)
            #expect(!statuses.contains { $0 >= 500 && $0 != 503 }, "statuses seen: \(Set(statuses))")
            try await expectServesAValidWebhook(sidecar, receiver)
            try await waitUntil("the resident set (\(child.residentKilobytes) kB) back near \(afterFirst) kB") {
                child.residentKilobytes <= afterFirst + Self.slackKilobytes + Sanitizer.retainedKilobytes
            }
            #expect(!child.log.contains { $0.contains(#""status":500"#) || $0.contains(#""level":"critical""#) })
        }
    }

    @Test func thousandsOfIdleConnectionsDoNotStopAValidWebhook() async throws {
        raiseFileLimit()
        let count = 2000
        try await abuse(webhooks: #""maxConnections": 4096"#) { sidecar, receiver in
            let idle = try await offPool { Result { try (0..<count).map { _ in try RawConnection(port: sidecar.webhookPort) } } }.get()
            // While all of them are held open, a valid webhook is still answered.
            try await expectServesAValidWebhook(sidecar, receiver)
            withExtendedLifetime(idle) {}
            return [200]
        }
    }

    @Test func connectionsBeyondMaxConnectionsWaitOnlyUntilTheHeadDeadlineFreesThem() async throws {
        try await abuse(webhooks: #""maxConnections": 16, "readTimeoutSeconds": \#(Sanitizer.slowdown)"#) { sidecar, receiver in
            let idle = try await offPool { Result { try (0..<32).map { _ in try RawConnection(port: sidecar.webhookPort) } } }.get()
            // The first 16 are cut off by the one-second head deadline, then the next 16, so the probe
            // behind them gets in (30 s: a liveness bound far above those two seconds, not a measure).
            try await expectServesAValidWebhook(sidecar, receiver, timeout: .seconds(30))
            let closed = await offPool { idle.prefix(16).allSatisfy { $0.isClosedByPeer() } }
            #expect(closed)
            return [200]
        }
    }

    @Test func aClientThatSendsRequestsButNeverReadsTheAnswersIsCutOff() async throws {
        // The idle time-out does not run while an answer is being written: such a client held its
        // connection for good, and with it the only one `maxConnections` allowed.
        try await abuse(webhooks: #""maxConnections": 1, "readTimeoutSeconds": \#(Sanitizer.slowdown)"#) { sidecar, receiver in
            let hog = try RawConnection(port: sidecar.webhookPort, receiveBuffer: 4096)
            let pipelining = Task {
                await offPool {
                    var sent = 0
                    while sent < 1_000_000, hog.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") { sent += 1 }
                    return sent
                }
            }
            // Served once the hog is cut off, a second after its answers stopped being taken (30 s:
            // a liveness bound, not a measure).
            try await expectServesAValidWebhook(sidecar, receiver, timeout: .seconds(30))
            #expect(await pipelining.value < 1_000_000)
            return [200]
        }
    }

    @Test func slowHeadersSlowBodiesAndChunkedBodiesWithoutAnEndAreCutOff() async throws {
        try await abuse(webhooks: #""readTimeoutSeconds": \#(Sanitizer.slowdown)"#) { sidecar, receiver in
            let body = TestEvent.body()
            let signed = KoraSignature.headers(scheme: .timestamped, secret: Secret(TestSecrets.webhook), body: body, timestamp: UnixTime.now().seconds)
                .map { "\($0.name): \($0.value)\r\n" }.joined()
            let head = "POST /webhooks/koraidv HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\(signed)"
            let starts = [
                "POST /webhooks/koraidv HTTP/1.1\r\nHost: x\r\nX-Slow: ",  // a head that never ends
                head + "Content-Length: \(body.count)\r\n\r\n" + String(decoding: body.prefix(10), as: UTF8.self),  // a body that never ends
                head + "Transfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n",  // chunks without the last one
            ]
            let connections = try await offPool {
                Result {
                    try (0..<300).map { index in
                        let connection = try RawConnection(port: sidecar.webhookPort)
                        connection.send(starts[index % starts.count])
                        return connection
                    }
                }
            }.get()
            try await expectServesAValidWebhook(sidecar, receiver)
            // Each is closed without an answer, or answered 408 and closed: never accepted, never a 5xx,
            // never left open. One deadline for all of them, as each read alone may wait 10 s.
            let deadline = ContinuousClock.now + .seconds(60) * Sanitizer.slowdown
            var statuses: [Int] = []
            for connection in connections {
                guard ContinuousClock.now < deadline else { throw TimedOut(what: "the sidecar to cut off \(connections.count) slow requests") }
                let status = try await Self.refusal(on: connection, closing: true)
                #expect([nil, 408].contains(status), "answered \(status.map(String.init) ?? "nothing")")
                statuses.append(status ?? 408)
            }
            return statuses
        }
    }

    /// How the sidecar ended a request it must refuse: the status it answered (with `closing`, it must
    /// have closed the connection after it too), or nil when it closed the connection (end of stream or
    /// a reset) without a byte of an answer. Throws when it did neither within the connection's read
    /// time-out (a request left hanging is what these tests are there to catch), or sent no HTTP answer.
    static func refusal(on connection: RawConnection, closing: Bool = false) async throws -> Int? {
        let (answer, closed) = await offPool {
            let answer = connection.readResponse()
            // An empty read ended by the peer reads end of stream again at once; one ended by the time-out
            // waits for the time-out again, then says it is still open.
            return (answer, closing || statusCode(of: answer) == nil ? connection.isClosedByPeer() : true)
        }
        let status = statusCode(of: answer)
        guard closed, status != nil || answer.isEmpty else {
            throw TimedOut(what: "the sidecar to answer or close the connection; it sent \(answer.isEmpty ? "nothing" : String(answer.prefix(200)))")
        }
        return status
    }

    @Test func oversizedHeadersAndBodiesAreRefused() async throws {
        try await abuse { sidecar, _ in
            let long = String(repeating: "a", count: 20_000)
            let many = (0..<2000).map { "X-H\($0): v\r\n" }.joined()
            let requests = [
                "POST /webhooks/koraidv HTTP/1.1\r\nHost: x\r\nX-Long: \(long)\r\nContent-Length: 2\r\n\r\n{}",
                "POST /webhooks/koraidv HTTP/1.1\r\nHost: x\r\n\(many)Content-Length: 2\r\n\r\n{}",
                "POST /webhooks/koraidv?\(long) HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
                "POST /webhooks/koraidv HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n",
                "POST /webhooks/koraidv HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
            ]
            var statuses: [Int] = []
            let deadline = ContinuousClock.now + .seconds(60) * Sanitizer.slowdown
            for _ in 0..<20 {
                for request in requests {
                    guard ContinuousClock.now < deadline else { throw TimedOut(what: "the sidecar to refuse 100 oversized requests") }
                    let connection = try RawConnection(port: sidecar.webhookPort)
                    connection.send(request)
                    // Closed without an answer (or reset before the client read it): refused all the same.
                    let status = try await Self.refusal(on: connection) ?? 431
                    #expect([400, 413, 414, 431].contains(status), "\(request.prefix(60))")
                    statuses.append(status)
                }
            }
            return statuses
        }
    }

    @Test func invalidUTF8DeepNestingAndDuplicateKeysAreAnsweredNever500() async throws {
        try await abuse { sidecar, _ in
            let bodies: [[UInt8]] = [
                Array(#"{"id":"evt_utf8","type":"verification.completed","data":{"x":""#.utf8) + [0xC3, 0x28, 0xFF, 0xED, 0xA0, 0x80] + Array(#""}}"#.utf8),
                Array((String(repeating: "[", count: 100_000) + String(repeating: "]", count: 100_000)).utf8),
                Array((#"{"type":"verification.completed","data":"# + String(repeating: #"{"a":"#, count: 5000) + "1" + String(repeating: "}", count: 5001)).utf8),
                Array(#"{"id":"evt_dup_a","id":"evt_dup_b","type":"verification.completed","type":"fraud_alert.created","data":{"verificationId":"v1"},"data":{"verificationId":"v2"}}"#.utf8),
            ]
            var statuses: [Int] = []
            for body in bodies {
                let signed = try await sendSigned(body, to: sidecar)
                #expect([200, 400].contains(signed.status), "\(signed.body)")
                if signed.status == 200 {
                    // Whichever duplicate key won, the same bytes again are the same event.
                    let replay = try await sendSigned(body, to: sidecar)
                    #expect(replay.json?["duplicate"] == true, "\(replay.body)")
                    statuses.append(replay.status)
                }
                let unsigned = try await post(sidecar.webhookURL, body: body, headers: [])
                #expect(unsigned.status == 401)
                statuses += [signed.status, unsigned.status]
            }
            // Bytes that are not UTF-8 in the head itself.
            let connection = try RawConnection(port: sidecar.webhookPort)
            connection.send(Array("POST /webhooks/koraidv HTTP/1.1\r\nHost: x\r\nX-Signature: ".utf8) + [0xFF, 0xFE, 0xC0] + Array("\r\nContent-Length: 2\r\n\r\n{}".utf8))
            statuses.append(try await Self.refusal(on: connection) ?? 400)
            return statuses
        }
    }

    @Test func aSignatureOrBodyWithAnyOneByteChangedIsRefused() async throws {
        try await abuse { sidecar, receiver in
            let body = TestEvent.body()
            let timestamp = UnixTime.now().seconds
            let headers = KoraSignature.headers(scheme: .timestamped, secret: Secret(TestSecrets.webhook), body: body, timestamp: timestamp)
            let signature = Array(headers[0].value.utf8)
            let delivered = receiver.count
            var statuses: [Int] = []
            func send(_ body: [UInt8], signature: [UInt8]) async throws {
                let answer = try await post(
                    sidecar.webhookURL, body: body,
                    headers: [("X-Signature", String(decoding: signature, as: UTF8.self)), ("X-Timestamp", String(timestamp)), ("X-Signature-Algorithm", "sha256")])
                #expect(answer.status == 401, "\(answer.body)")
                statuses.append(answer.status)
            }
            for position in signature.indices {
                var forged = signature
                // Another hex digit, so that only the value is wrong, not the format.
                forged[position] = forged[position] == UInt8(ascii: "0") ? UInt8(ascii: "1") : UInt8(ascii: "0")
                try await send(body, signature: forged)
            }
            for position in body.indices {
                var forged = body
                forged[position] ^= 0x01
                try await send(forged, signature: signature)
            }
            #expect(receiver.count == delivered)
            return statuses
        }
    }

    @Test func replaysAreDuplicatesInsideTheWindowAndRefusedOutsideIt() async throws {
        try await abuse { sidecar, receiver in
            let now = UnixTime.now().seconds
            let id = "evt_replayed_" + RandomID.make()
            let body = TestEvent.body(eventID: id)
            let first = try await sendSigned(body, to: sidecar, timestamp: now - 200)
            #expect(first.status == 200)
            var statuses = [first.status]
            // Replayed inside the window, the same signed request is acknowledged but not delivered again.
            for _ in 0..<20 {
                let replay = try await sendSigned(body, to: sidecar, timestamp: now - 200)
                #expect(replay.status == 200)
                #expect(replay.json?["duplicate"] == true)
                statuses.append(replay.status)
            }
            // Captured long ago or stamped in the future, it is stale whatever the body.
            for offset: Int64 in [-3600, -400, 400, 86_400] {
                for replayed in [body, TestEvent.body()] {
                    let stale = try await sendSigned(replayed, to: sidecar, timestamp: now + offset)
                    #expect(stale.status == 401)
                    #expect(stale.code == "STALE_TIMESTAMP")
                    statuses.append(stale.status)
                }
            }
            try await waitUntil("the one delivery") { receiver.deliveries.contains { $0.header("webhook-id") == id } }
            #expect(receiver.deliveries.filter { $0.header("webhook-id") == id }.count == 1)
            return statuses
        }
    }
}

/// Raises this process's soft limit of open files to its hard limit (children inherit it).
func raiseFileLimit() {
    var limit = rlimit()
    getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
    limit.rlim_cur = limit.rlim_max
    setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
}
