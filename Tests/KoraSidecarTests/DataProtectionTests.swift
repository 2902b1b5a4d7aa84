import AsyncHTTPClient
import Foundation
import Logging
import NIOCore
import NIOConcurrencyHelpers
import PostgresNIO
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

/// Identity data at rest: sealed in the store, kept no longer than needed, erasable, and never in
/// logs or metrics.
@Suite("Data protection")
struct DataProtectionTests {
    typealias Kind = StoreTests.Kind

    let t0 = UnixTime(milliseconds: 1_800_000_000_000)
    func at(_ seconds: Int64) -> UnixTime { UnixTime(milliseconds: t0.milliseconds + seconds * 1000) }

    /// An event about `verification` whose body carries `marker` as the external id and in its metadata.
    func event(_ id: String, verification: String, marker: String) throws -> KoraEvent {
        var body = try JSONParser.parse(TestEvent.body(externalID: marker, eventID: id, verificationID: verification))
        if case .object(var members) = body, let index = members.firstIndex(where: { $0.key == "data" }),
            case .object(var data) = members[index].value
        {
            data.append(.init("metadata", ["note": .string(marker + "-metadata")]))
            members[index].value = .object(data)
            body = .object(members)
        }
        return try EventNormalizer.normalize(
            body: JSONWriter.encode(body), webhookID: nil, receivedAt: .now(), originalHeaders: [("X-Signature", "sig-" + marker)])
    }

    static let otherKey = SealingKey(id: "other", base64: "T3RoZXJLZXlGb3JLb3JhU2lkZWNhclRlc3RzMzJCISE=")!
    static let testKey = SealingKey(id: "test", base64: TestSecrets.encryptionKey)!

    /// A store of `kind` on one file or database that can be opened again with other keys.
    struct Reopenable {
        let kind: Kind
        let location: String

        static func make(_ kind: Kind) async throws -> Reopenable {
            switch kind {
            case .sqlite: Reopenable(kind: kind, location: try temporaryDirectory() + "/store.sqlite")
            case .postgres: Reopenable(kind: kind, location: try await PostgresServer.shared().createDatabase())
            case .memory: Reopenable(kind: kind, location: "")
            }
        }

        /// Runs `body` with the store opened with `keys`, then closes it.
        func with<T: Sendable>(_ keys: [SealingKey], payloadRetention: Duration = .seconds(86_400), _ body: (any SidecarStore) async throws -> T) async throws -> T {
            let protection = DataProtection(sealer: PayloadSealer(keys: keys), payloadRetention: payloadRetention)
            switch kind {
            case .sqlite:
                let store = try SQLiteStore(path: location, protection: protection)
                defer { store.close() }
                return try await body(store)
            case .postgres:
                let store = try PostgresStore(
                    url: Secret(location), logger: quietLogger, operationTimeout: .seconds(5) * Sanitizer.slowdown, protection: protection)
                let running = Task { await store.run() }
                defer { running.cancel() }
                try await store.waitUntilMigrated(timeout: .seconds(60))
                return try await body(store)
            case .memory:
                return try await body(InMemoryStore())
            }
        }

        /// Every byte the database keeps for it: the SQLite file and its WAL, or PostgreSQL's rows as text.
        func storedBytes() async throws -> [UInt8] {
            switch kind {
            case .sqlite:
                return [location, location + "-wal"].compactMap { FileManager.default.contents(atPath: $0) }.flatMap { Array($0) }
            case .postgres:
                let client = PostgresClient(configuration: try PostgresURL(Secret(location)).clientConfiguration, backgroundLogger: quietLogger)
                let running = Task { await client.run() }
                defer { running.cancel() }
                var text = ""
                for table in ["kora_events", "kora_quarantine", "kora_deliveries", "kora_attempts"] {
                    let rows = try await client.query(PostgresQuery(unsafeSQL: "SELECT row_to_json(t)::text FROM \(table) t"), logger: quietLogger)
                    for try await (row) in rows.decode(String.self) { text += row }
                }
                return Array(text.utf8)
            case .memory:
                return []
            }
        }
    }

    @Test(arguments: [Kind.sqlite, .postgres])
    func bodiesAreSealedAtRestAndOpenWithAnyConfiguredKey(kind: Kind) async throws {
        let marker = "MARKER-" + RandomID.make()
        let stored = try event("e1", verification: "ver_1", marker: marker)
        let store = try await Reopenable.make(kind)
        try await store.with([Self.testKey]) { store in
            #expect(try await store.enqueue(stored, services: ["a"], at: t0, dedupSince: at(-1)) == .accepted)
            try await store.quarantine(
                QuarantinedPayload(receivedAt: t0, reason: "not an object", body: Array("[\"\(marker)-q\"]".utf8), headers: ["X-Signature": marker], signatureVerified: true))
        }
        // Neither the marker nor its hex (how PostgreSQL prints bytea) is anywhere in the database.
        let bytes = try await store.storedBytes()
        #expect(!bytes.isEmpty)
        #expect(bytes.firstRange(of: Array(marker.utf8)) == nil)
        #expect(bytes.firstRange(of: Array(Hex.encode(Array(marker.utf8)).utf8)) == nil)

        // Without its key a body is reported, not a crash; with it among others, it opens as stored.
        try await store.with([Self.otherKey]) { store in
            let job = try #require(try await store.claimDue(service: "a", now: at(1), limit: 1, lease: .seconds(1)).first)
            #expect(job.bodyProblem == .unreadable(UnreadablePayload(keyID: "test", reason: .keyMissing)))
            #expect(job.event.id == "e1")
            #expect(try await store.quarantined(limit: 1).first?.bodyProblem != nil)
        }
        try await store.with([Self.otherKey, Self.testKey]) { store in
            let job = try #require(try await store.claimDue(service: "a", now: at(3), limit: 1, lease: .seconds(1)).first)
            #expect(job.bodyProblem == nil)
            #expect(job.event == stored)
            #expect(try await store.quarantined(limit: 1).first?.headers["X-Signature"] == marker)
            // Rotation: sealed again under the first key, after which the old key is not needed.
            #expect(try await store.reseal() == { var r = ResealReport(); r.resealed = 2; return r }())
            #expect(try await store.reseal().resealed == 0)
        }
        try await store.with([Self.otherKey]) { store in
            let detail = try #require(try await store.delivery(id: 1))
            #expect(try detail.event.get() == stored)
            #expect(try await store.keptQuarantined().contains { String(decoding: $0.body, as: UTF8.self).contains(marker + "-q") })
        }
    }

    @Test(arguments: Kind.allCases)
    func bodiesGoAfterTheirRetentionAndTheMetadataStays(kind: Kind) async throws {
        let store = try await Reopenable.make(kind)
        try await store.with([Self.testKey]) { store in
            _ = try await store.enqueue(try event("e1", verification: "ver_1", marker: "m"), services: ["a", "b"], at: t0, dedupSince: at(-1))
            _ = try await store.enqueue(try event("e2", verification: "ver_2", marker: "m"), services: ["a"], at: t0, dedupSince: at(-1))
            for service in ["a", "b"] {
                for job in try await store.claimDue(service: service, now: at(1), limit: 10, lease: .seconds(60)) {
                    let dead = job.event.id == "e1" && service == "b"
                    let record = AttemptRecord(attempt: 1, at: at(10), statusCode: dead ? 500 : 204, error: nil, durationMilliseconds: 1)
                    try await store.finish(deliveryID: job.deliveryID, leasedUntil: job.leaseUntil, attempt: record, next: dead ? .dead : .delivered)
                }
            }
            #expect(try await store.expireBodies(deliveredBefore: at(5), deadBefore: at(5), limit: 100) == 0)
            // e2 was delivered everywhere; e1 has a dead delivery, kept for the longer deadRetention.
            #expect(try await store.expireBodies(deliveredBefore: at(20), deadBefore: at(5), limit: 100) == 1)
            let listed = try await store.deliveries(status: nil, limit: 10)
            #expect(listed.count == 3)
            let e2 = try #require(listed.first { $0.eventID == "e2" })
            #expect(e2.verificationID == "ver_2")
            #expect(try await store.delivery(id: e2.id)?.event == .failure(.expired))
            #expect(try await store.requeue(DeliveryFilter(statuses: [.delivered]), at: at(30), dryRun: true) == RequeueCount(selected: 1, bodyGone: 1))
            #expect(try await !store.requeue(id: e2.id, at: at(30)))
            #expect(try await store.expireBodies(deliveredBefore: at(20), deadBefore: at(20), limit: 100) == 1)
            let dead = try #require(listed.first { $0.status == .dead })
            #expect(try await !store.requeue(id: dead.id, at: at(30)))
            #expect(try await store.keptEvents(after: 0, limit: 10).bodies.isEmpty)
        }
    }

    @Test(arguments: [Kind.sqlite, .postgres])
    func aZeroPayloadRetentionDeletesTheBodyOnceTheLastDeliveryWasDelivered(kind: Kind) async throws {
        let store = try await Reopenable.make(kind)
        try await store.with([Self.testKey], payloadRetention: .zero) { store in
            _ = try await store.enqueue(try event("e1", verification: "ver_1", marker: "m"), services: ["a", "b"], at: t0, dedupSince: at(-1))
            let a = try #require(try await store.claimDue(service: "a", now: at(1), limit: 1, lease: .seconds(60)).first)
            try await store.finish(deliveryID: a.deliveryID, leasedUntil: a.leaseUntil, attempt: .init(attempt: 1, at: at(2), statusCode: 204, error: nil, durationMilliseconds: 1), next: .delivered)
            // b still waits for it.
            #expect(try await store.delivery(id: a.deliveryID)?.event.map(\.id) == .success("e1"))
            let b = try #require(try await store.claimDue(service: "b", now: at(3), limit: 1, lease: .seconds(60)).first)
            try await store.finish(deliveryID: b.deliveryID, leasedUntil: b.leaseUntil, attempt: .init(attempt: 1, at: at(4), statusCode: 204, error: nil, durationMilliseconds: 1), next: .delivered)
            #expect(try await store.delivery(id: a.deliveryID)?.event == .failure(.expired))
        }
    }

    @Test(arguments: Kind.allCases)
    func erasureRemovesEveryTraceOfAPersonButTheEventIDs(kind: Kind) async throws {
        let store = try await Reopenable.make(kind)
        let logs = TestLogs()
        try await store.with([Self.testKey]) { store in
            _ = try await store.enqueue(try event("e1", verification: "ver_A", marker: "person-x"), services: ["a"], at: t0, dedupSince: at(-1))
            _ = try await store.enqueue(try event("e2", verification: "ver_A", marker: "person-x"), services: [], at: t0, dedupSince: at(-1))
            _ = try await store.enqueue(try event("e3", verification: "ver_B", marker: "person-y"), services: ["a"], at: t0, dedupSince: at(-1))
            // A fraud alert about the person and no verification: found by the person's id alone.
            let alert = try EventNormalizer.normalize(
                body: Array(#"{"id":"e4","type":"fraud_alert.created","data":{"alertId":"fa_1","externalId":"person-x","description":"d"}}"#.utf8),
                webhookID: nil, receivedAt: .now())
            #expect(alert.verificationID == nil)
            _ = try await store.enqueue(alert, services: ["a"], at: t0, dedupSince: at(-1))
            try await store.quarantine(
                QuarantinedPayload(receivedAt: t0, reason: "r", body: Array(#"["person-x"]"#.utf8), headers: [:], signatureVerified: true))
            try await store.quarantine(
                QuarantinedPayload(receivedAt: t0, reason: "r", body: Array(#"["someone else"]"#.utf8), headers: [:], signatureVerified: true))
            try await store.recordOrigin(verificationID: "ver_A", service: "a", at: t0)
            #expect(try await store.claimIdempotencyKey(service: "a", key: "k1", digest: "d", at: t0) == nil)
            try await store.settleIdempotencyKey(
                service: "a", key: "k1", state: .answered(status: 201, contentType: "application/json", body: Array(#"{"id":"ver_A"}"#.utf8)), at: t0)
            // A create whose events are gone still names the person in Kora's answer.
            #expect(try await store.claimIdempotencyKey(service: "a", key: "k2", digest: "d", at: t0) == nil)
            try await store.settleIdempotencyKey(
                service: "a", key: "k2", state: .answered(status: 201, contentType: nil, body: Array(#"{"id":"ver_old","externalId":"person-x"}"#.utf8)),
                at: t0)

            let report = try await OperatorActions.erase(.externalID("person-x"), store: store, logger: logs.logger())
            #expect(report.verificationIDs == ["ver_A"])
            #expect([report.events, report.deliveries, report.quarantined, report.origins, report.idempotencyKeys] == [3, 2, 1, 1, 2] as [Int])
            #expect(try await store.deliveries(status: nil, limit: 10).map(\.eventID) == ["e3"])
            #expect(try await store.unroutedCount() == 0)
            #expect(try await store.quarantined(limit: 10).count == 1)
            #expect(try await store.origin(ofVerification: "ver_A") == nil)
            #expect(try await store.idempotencyRecord(service: "a", key: "k1") == nil)
            #expect(try await store.idempotencyRecord(service: "a", key: "k2") == nil)
            // Kora's retry of an erased event is a duplicate, not a new copy of the data.
            #expect(try await store.enqueue(try event("e1", verification: "ver_A", marker: "person-x"), services: ["a"], at: at(1), dedupSince: at(-1)) == .duplicate)
            // By verification id; a second erasure finds nothing.
            #expect(try await OperatorActions.erase(.verification("ver_B"), store: store, logger: logs.logger()).events == 1)
            #expect(try await OperatorActions.erase(.verification("ver_B"), store: store, logger: logs.logger()).events == 0)
        }
        // One audit line each, naming the verifications, never the person.
        let lines = logs.all.filter { $0.contains("Erased stored data") }
        #expect(lines.count == 3)
        #expect(lines[0].contains("ver_A"))
        #expect(!logs.all.joined().contains("person-x"))
    }
}

extension DataProtectionTests {
    @Test func erasingAPersonFindsTheirQuarantinedPayloadsHoweverTheSenderEscapedTheId() async throws {
        let store = InMemoryStore()
        // Unparseable, as quarantined payloads are; escaped as json.dumps (\u00e9) and PHP (\/) write it.
        for body in [#"{"data":{"externalId":"jos\u00e9\/a@x.example""#, #"["jos\u00E9/a@x.example"]"#, #"["jos\u00e9/b@x.example"]"#] {
            try await store.quarantine(QuarantinedPayload(receivedAt: t0, reason: "r", body: Array(body.utf8), headers: [:], signatureVerified: true))
        }
        // Kora's answer to a create, kept for an Idempotency-Key, escaped as Python would write it.
        #expect(try await store.claimIdempotencyKey(service: "a", key: "k", digest: "d", at: t0) == nil)
        try await store.settleIdempotencyKey(
            service: "a", key: "k", state: .answered(status: 201, contentType: nil, body: Array(#"{"id":"ver_z","externalId":"jos\u00e9/a@x.example"}"#.utf8)),
            at: t0)
        let report = try await OperatorActions.erase(.externalID("josé/a@x.example"), store: store, logger: quietLogger)
        #expect(report.quarantined == 2)
        #expect(report.idempotencyKeys == 1)
        #expect(try await store.idempotencyRecord(service: "a", key: "k") == nil)
        #expect(try await store.quarantined(limit: 10).map { String(decoding: $0.body, as: UTF8.self) } == [#"["jos\u00e9/b@x.example"]"#])
    }

    @Test func aKeyFileIsLinkedInWholeOrNotAtAll() throws {
        // It was written in place: a full disk at a first start left it empty, and every later start
        // refused the empty file, with no backup to restore.
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let path = directory + "/store.sqlite.key"
        let key = SealingKey.generate(id: "local-test")
        try KeyFile.create(path, key: key)
        #expect(try KeyFile.read(path)?.id == "local-test")
        #expect((try FileManager.default.attributesOfItem(atPath: path)[.posixPermissions] as? Int) == 0o600)
        // One made meanwhile (another start) is kept as it is.
        #expect(throws: StartupError.self) { try KeyFile.create(path, key: SealingKey.generate(id: "local-other")) }
        #expect(try KeyFile.read(path)?.id == "local-test")
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory) == ["store.sqlite.key"])
    }

    @Test func aLostKeyFileStopsTheStartInsteadOfSealingWithANewKey() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        var storage = StorageConfiguration()
        storage.sqlitePath = directory + "/store.sqlite"
        let opened = try storage.open(logger: quietLogger)
        _ = try await opened.store.enqueue(try event("e1", verification: "ver_1", marker: "m"), services: ["a"], at: t0, dedupSince: at(-1))
        try await stop(opened.service)
        // The same key opens it again.
        let again = try storage.open(logger: quietLogger)
        #expect(try await again.store.delivery(id: 1)?.event.map(\.id) == .success("e1"))
        try await stop(again.service)
        try FileManager.default.removeItem(atPath: storage.keyFilePath)
        #expect {
            try storage.open(logger: quietLogger)
        } throws: { error in
            "\(error)".contains("key file \(storage.keyFilePath) is missing") && "\(error)".contains("restore the key file")
        }
        #expect(!FileManager.default.fileExists(atPath: storage.keyFilePath))
    }
}

/// The real binary: marker values in a verification's data pass through every path (accepted,
/// duplicate, quarantined, dead, erased) and appear in no log line, no metric, and nowhere in the
/// store's file; the key file is created once, readable by its owner alone.
@Suite("Data protection, the process")
struct DataProtectionProcessTests {
    @Test func markerValuesNeverReachLogsMetricsOrTheStoreFile() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let marker = "MARKER-" + RandomID.make()
        let receiver = Receiver { _, _ in .internalServerError }
        try await withReceiver(receiver) { (port: Int) async throws in
            let config = try writeProcessConfig(directory: directory, receiverPort: port, retrySchedule: ["100ms"])
            let child = try SidecarProcess(config: config)
            let sidecar = try await child.running()
            let body = TestEvent.body(externalID: marker, eventID: "evt_" + RandomID.make(), verificationID: "ver_marked")
            #expect(try await sendSigned(body, to: sidecar).status == 200)
            #expect(try await sendSigned(body, to: sidecar).json?["duplicate"] == .bool(true))
            #expect(try await sendSigned(Array("[\"\(marker)\"]".utf8), to: sidecar).status == 400)
            let other = TestEvent.body(externalID: "someone-else", verificationID: "ver_other")
            #expect(try await sendSigned(other, to: sidecar).status == 200)
            try await waitUntil("both deliveries to be dead", timeout: .seconds(20)) {
                (try await get(sidecar.internalURL("/admin/deliveries?status=dead")).json?["deliveries"]?.items?.count ?? 0) == 2
            }
            // The operator's own view opens the body; nothing else shows it.
            let dead = try await get(sidecar.internalURL("/admin/deliveries?status=dead&verification=ver_marked"))
            let id = try #require(dead.json?["deliveries"]?.items?.first?["id"]?.text)
            let shown = try await get(sidecar.internalURL("/admin/deliveries/\(id)"))
            #expect(shown.json?["bodyState"] == "kept")
            #expect(shown.json?["body"]?.text?.contains(marker) == true)
            // The console's listing pages back through the deliveries; its overview adds them up.
            let first = try await get(sidecar.internalURL("/admin/deliveries?limit=1"))
            let cursor = try #require(first.json?["next"]?.text)
            let second = try await get(sidecar.internalURL("/admin/deliveries?limit=1&before=\(cursor)"))
            #expect(second.json?["deliveries"]?.items?.first?["id"] != first.json?["deliveries"]?.items?.first?["id"])
            let third = try await get(sidecar.internalURL("/admin/deliveries?limit=1&before=\(second.json?["next"]?.text ?? "0")"))
            #expect(third.json?["deliveries"] == .array([]))
            #expect(third.json?["next"] == .null)
            #expect(try await get(sidecar.internalURL("/admin/deliveries?before=soon")).code == "INVALID_CURSOR")
            let overview = try await get(sidecar.internalURL("/admin/overview")).json
            #expect(overview?["ready"] == .bool(true))
            #expect(overview?["quarantined"] == .int(1))
            #expect(overview?["services"]?.items?.first?["dead"] == .int(2))
            #expect(overview?["services"]?.items?.first?["state"] == "closed")
            let minutes = try #require(overview?["webhooksPerMinute"]?.items)
            #expect(minutes.count == 60)
            let accepted: [Int] = minutes.compactMap { minute in minute["counts"]?["accepted"]?.text.flatMap { Int($0) } }
            #expect(accepted.reduce(0, +) == 2)
            let metrics = try await get(sidecar.internalURL("/metrics")).body
            #expect(metrics.contains(#"kora_sidecar_webhooks_total{result="accepted"} 2"#))

            let keyFile = directory + "/store.sqlite.key"
            let attributes = try FileManager.default.attributesOfItem(atPath: keyFile)
            #expect((attributes[.posixPermissions] as? Int) == 0o600)
            #expect(child.log.filter { $0.contains("Created an encryption key") }.count == 1)
            for file in ["/store.sqlite", "/store.sqlite-wal"] {
                let bytes = FileManager.default.contents(atPath: directory + file).map { Array($0) } ?? []
                #expect(bytes.firstRange(of: Array(marker.utf8)) == nil, "\(file)")
            }

            // Erased while serve runs: by the admin API, then by the command.
            let erased = try await post(sidecar.internalURL("/admin/erase"), body: Array(#"{"externalId": "\#(marker)"}"#.utf8), headers: [])
            // post() sends JSON; anything else is refused, so that no page elsewhere can erase through a browser.
            var plain = HTTPClientRequest(url: sidecar.internalURL("/admin/erase"))
            plain.method = .POST
            plain.headers.add(name: "Content-Type", value: "text/plain")
            plain.body = .bytes(ByteBuffer(string: #"{"externalId": "x"}"#))
            #expect(try await HTTPClient.shared.execute(plain, timeout: .seconds(30)).status.code == 415)
            #expect(erased.status == 200, "\(erased.body)")
            #expect(erased.json?["verificationIds"] == ["ver_marked"])
            #expect(erased.json?["quarantined"] == .int(1))
            #expect(try await get(sidecar.internalURL("/admin/deliveries/\(id)")).status == 404)
            // An id no store can hold names nothing: ver_other stays for the command below to erase.
            let unstorable = try await post(sidecar.internalURL("/admin/erase"), body: Array(#"{"verificationId": "ver_other\u0000x"}"#.utf8), headers: [])
            #expect(unstorable.status == 400)
            let both = try await post(
                sidecar.internalURL("/admin/erase"), body: Array(#"{"verificationId": "ver_other\u0000x", "externalId": "nobody"}"#.utf8), headers: [])
            #expect(both.status == 400, "exactly one of the two, whatever the other holds")
            let null = try await post(
                sidecar.internalURL("/admin/erase"), body: Array(#"{"verificationId": null, "externalId": "nobody"}"#.utf8), headers: [])
            #expect(null.status == 400, "a key holding null is there")
            let command = try await Binary.run(["erase", "--config", config, "--verification", "ver_other"])
            #expect(command.status == 0, "\(command.stderr)")
            #expect(command.stdout.contains(#""events": 1"#))
            #expect(command.stderr.contains("Erased stored data") && command.stderr.contains("ver_other"))
            #expect(try await get(sidecar.internalURL("/admin/deliveries")).json?["deliveries"] == .array([]))
            child.signal(SIGTERM)
            try await child.expectCleanExit()
            #expect(child.log.contains { $0.contains("Erased stored data") && $0.contains("ver_marked") })
            #expect(!(child.log + [metrics, command.stderr, command.stdout]).joined().contains(marker))
        }
    }
}

extension JSONValue {
    /// The elements of an array.
    var items: [JSONValue]? {
        if case .array(let elements) = self { elements } else { nil }
    }
}
