import Foundation
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

/// Real faults under the real binary or real listeners: a full disk, a read-only store, a broken
/// store file at start-up, a service and a Kora that hang or reset, a wall clock that jumps.
@Suite("Fault injection", .serialized)
struct FaultInjectionTests {
    /// While `inject` holds, new webhooks get 503 `UNAVAILABLE` (never 200) and `/readyz` names the
    /// store, and the log says `reason`; once `remove` ran, the same process recovers: ready again, Kora's retries accepted.
    func storeFault(directory: String, reason: String, inject: @escaping @Sendable () async throws -> Void, remove: @escaping @Sendable () async throws -> Void) async throws {
        try await withChildSidecar(directory: directory) { child, sidecar, receiver in
            try await expectServesAValidWebhook(sidecar, receiver)
            try await inject()
            let refused = (0..<3).map { "evt_during_fault_\($0)" }
            do {
                for id in refused {
                    let answer = try await sendSigned(TestEvent.body(eventID: id), to: sidecar)
                    #expect(answer.status == 503, "\(answer.body)")
                    #expect(answer.code == "UNAVAILABLE")
                }
                let notReady = try await get(sidecar.internalURL("/readyz"))
                #expect(notReady.status == 503)
                #expect(notReady.json?["reason"]?.text?.contains("store") == true, "\(notReady.body)")
            } catch {
                // The fault goes first: a process stuck on a frozen disk could not be stopped.
                try? await remove()
                throw error
            }
            try await remove()
            try await waitUntil("readiness to recover") { try await get(sidecar.internalURL("/readyz")).status == 200 }
            for id in refused { #expect(try await sendSigned(TestEvent.body(eventID: id), to: sidecar).status == 200) }
            try await waitUntil("Kora's retries to be delivered") {
                Set(receiver.deliveries.compactMap { $0.header("webhook-id") }).isSuperset(of: refused)
            }
            try await expectServesAValidWebhook(sidecar, receiver)
            let reported = child.log.filter { $0.contains("Webhook not stored") }
            #expect(reported.count == refused.count)
            #expect(reported.allSatisfy { $0.contains(reason) }, "\(reported)")
        }
    }

    @Test(.enabled(if: runningAsRoot, "mounting a tmpfs needs root"))
    func aFullDiskAnswers503AndRecoversWithoutRestart() async throws {
        // A real 4 MB tmpfs: filling it makes SQLite's own writes fail with ENOSPC (SQLITE_FULL).
        let disk = try await TinyFilesystem.mount(megabytes: 4)
        defer { Task { await disk.unmount() } }
        try await storeFault(directory: disk.path, reason: "full", inject: { try disk.fill() }, remove: { try disk.free() })
    }

    @Test(.enabled(if: runningAsRoot, "mounting a loop device needs root"))
    func aStalledDiskAnswers503AndRecoversWithoutRestart() async throws {
        // A frozen file system: every write waits (a stalled network volume). Webhooks and /readyz
        // got no answer at all, for as long as the disk stalled.
        let disk = try await FreezableFilesystem.mount()
        do {
            try await storeFault(
                directory: disk.path, reason: "did not answer", inject: { try await disk.freeze(true) }, remove: { try await disk.freeze(false) })
        } catch {
            await disk.unmount()
            throw error
        }
        await disk.unmount()
    }

    @Test(.enabled(if: runningAsRoot, "chattr +i needs root"))
    func aReadOnlyStoreAnswers503AndRecoversWithoutRestart() async throws {
        // `chattr +i` on the database and its WAL: the kernel refuses every write (EPERM), even
        // root's, through the descriptors the sidecar already holds. (Not the -shm file: it is
        // mapped, and a refused write there would be a SIGBUS, not a fault the store can answer.)
        let directory = try temporaryDirectory()
        let files = [directory + "/store.sqlite", directory + "/store.sqlite-wal"]
        defer {
            clearImmutable(files)
            try? FileManager.default.removeItem(atPath: directory)
        }
        try await storeFault(
            directory: directory, reason: "I/O", inject: { try await setImmutable(true, files) }, remove: { try await setImmutable(false, files) })
    }

    @Test func aCorruptOrTruncatedStoreAtStartUpIsOneSentenceNamingTheFile() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let config = try writeProcessConfig(directory: directory, receiverPort: 9)
        let store = directory + "/store.sqlite"
        // A healthy store first, so that the truncation below cuts a real SQLite file.
        let first = try SidecarProcess(config: config)
        _ = try await first.ports()
        first.signal(SIGTERM)
        try await first.expectCleanExit()
        let healthy = try Data(contentsOf: URL(fileURLWithPath: store))

        for (name, bytes) in [("garbage", Data(repeating: 0x42, count: 8192)), ("truncated", healthy.prefix(60))] {
            // Without its WAL (which would otherwise stand in for the pages it holds).
            for suffix in ["-wal", "-shm"] { try? FileManager.default.removeItem(atPath: store + suffix) }
            try bytes.write(to: URL(fileURLWithPath: store))
            let started = try SidecarProcess(config: config)
            #expect(try await started.exitStatus(timeout: .seconds(20)) == 1, "\(name)")
            let lines = started.log
            #expect(lines.count == 1 && lines[0].contains(store) && lines[0].contains("storage.sqlitePath"), "\(name): \(lines)")
            #expect(!lines.contains { $0.contains("Fatal error") })
        }
    }

    @Test func aStoreDeletedBeforeStartUpIsCreatedAfreshAndServes() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try await withChildSidecar(directory: directory) { _, sidecar, receiver in
            try await expectServesAValidWebhook(sidecar, receiver)
        }
        for suffix in ["", "-wal", "-shm"] { try? FileManager.default.removeItem(atPath: directory + "/store.sqlite" + suffix) }
        try await withChildSidecar(directory: directory) { _, sidecar, receiver in
            try await expectServesAValidWebhook(sidecar, receiver)
            #expect(FileManager.default.fileExists(atPath: directory + "/store.sqlite"))
        }
    }

    @Test func aStoreFileMovedAwayWhileServingIsNotWrittenTo() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let store = directory + "/store.sqlite"
        try await withChildSidecar(directory: directory) { _, sidecar, receiver in
            try await expectServesAValidWebhook(sidecar, receiver)
            // The open file lives on without a name: what it took would be gone at the next start.
            try FileManager.default.moveItem(atPath: store, toPath: store + ".moved")
            #expect(try await sendSigned(TestEvent.body(eventID: "evt_nameless"), to: sidecar).status == 503)
            let readyz = try await get(sidecar.internalURL("/readyz"))
            #expect(readyz.status == 503 && readyz.body.contains("storage.sqlitePath"), "\(readyz.body)")
            // Put back, the same file takes writes again; Kora's retry of the refused event is accepted.
            try FileManager.default.moveItem(atPath: store + ".moved", toPath: store)
            #expect(try await sendSigned(TestEvent.body(eventID: "evt_nameless"), to: sidecar).status == 200)
            try await expectServesAValidWebhook(sidecar, receiver)
        }
    }

    @Test func aServiceThatAcceptsButNeverAnswersTimesOutIsRetriedAndStarvesNoOne() async throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let hung = try SilentPeer(.hold)
        let healthy = Receiver()
        try await withReceiver(healthy) { (port: Int) async throws in
            // One second for the hung service, to time out quickly; all a loaded machine needs for the
            // healthy one (three time-outs in a row would make one of its deliveries dead).
            func service(_ name: String, _ port: Int, timeoutSeconds: Int) -> String {
                #"{"name": "\#(name)", "deliver": {"url": "http://127.0.0.1:\#(port)/events", "signingSecret": "\#(TestSecrets.signing)", "timeoutSeconds": \#(timeoutSeconds), "breaker": {"failures": 1000}}, "token": "token-\#(name)"}"#
            }
            let config = try writeProcessConfig(
                directory: directory, receiverPort: port, retrySchedule: ["50ms", "50ms"],
                services: "[\(service("hung", hung.port, timeoutSeconds: 1)), \(service("healthy", port, timeoutSeconds: 30))]")
            let child = try SidecarProcess(config: config)
            let sidecar = try await child.running()
            let count = 16
            for index in 0..<count {
                #expect(try await sendSigned(TestEvent.body(eventID: "evt_hung_\(index)"), to: sidecar).status == 200)
            }
            // Every worker of "hung" is stuck in a connection that never answers, yet "healthy" gets all.
            _ = try await healthy.waitFor(count)
            // Each delivery to "hung" times out after 1 s, is retried twice, then is dead.
            try await waitUntil("every delivery to the hung service to be dead", timeout: .seconds(60)) {
                let listed = try await Binary.run(["deliveries", "list", "--status", "dead", "--limit", "100", "--config", config])
                return listed.stdout.components(separatedBy: "\"status\": \"dead\"").count - 1 == count
            }
            // Each attempt's connection was accepted (the hung peer's thread may count the last ones late).
            try? await waitUntil("the hung service to count its connections") { hung.accepted >= count * 3 }
            #expect(hung.accepted == count * 3)
            let listed = try await Binary.run(["deliveries", "list", "--status", "dead", "--limit", "100", "--config", config])
            let dead: [JSONValue] = if case .array(let list)? = try? JSONParser.parse(Array(listed.stdout.utf8)) { list } else { [] }
            #expect(dead.count == count, "\(listed.stdout)")
            for delivery in dead {
                #expect(delivery["service"]?.text == "hung", "\(delivery)")
                #expect(delivery["attempts"] == .int(3), "\(delivery)")
                #expect(delivery["lastError"]?.text == "timed out", "\(delivery)")
            }
            let id = try #require(dead.first?["id"]?.text)
            let shown = try await Binary.run(["deliveries", "show", id, "--config", config])
            let history = (try? JSONParser.parse(Array(shown.stdout.utf8)))?["history"]
            let attempts: [JSONValue] = if case .array(let list)? = history { list } else { [] }
            #expect(attempts.map { $0["error"]?.text } == ["timed out", "timed out", "timed out"], "\(shown.stdout)")
            child.signal(SIGTERM)
            try await child.expectCleanExit()
        }
    }

    @Test(arguments: [SilentPeer.Behaviour.hold, .reset])
    func koraHangingOrResettingGetsACleanErrorWithinItsTimeout(_ behaviour: SilentPeer.Behaviour) async throws {
        let kora = try SilentPeer(behaviour)
        var configuration = proxyConfiguration(koraBaseURL: "http://127.0.0.1:\(kora.port)/api/v1/idv", services: [appService()])
        // A hung Kora must run into the time-out (1 s); a resetting one must reset every attempt before
        // it, which on a loaded machine takes margin.
        configuration.kora.timeoutSeconds = behaviour == .hold ? 1 : 30
        let sleeper = SleepRecorder()
        try await withProxySidecar(configuration, options: proxyOptions(sleeper)) { sidecar in
            let sdk = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
            let read = try await sdk.call(.GET, "/verifications/ver_1")
            let write = try await sdk.createVerification(externalID: "u")
            switch behaviour {
            case .hold:
                // A time-out is not retried: Kora may still be working on it.
                for answer in [read, write] {
                    #expect(answer.status == 504)
                    #expect(answer.code == "KORA_TIMEOUT")
                }
                #expect(kora.accepted == 2)
            case .reset:
                // A reset read is retried up to maxAttempts; a write that may have arrived is not.
                for answer in [read, write] {
                    #expect(answer.status == 502)
                    #expect(answer.code == "KORA_UNREACHABLE")
                }
                #expect(kora.accepted >= 3)
            }
        }
    }

    @Test func theSignatureWindowFollowsTheClockWhenItJumps() async throws {
        let clock = ManualClock()
        var options = SidecarOptions()
        options.clock = { clock.read() }
        options.store = InMemoryStore()
        let fixed = options
        let receiver = Receiver()
        try await withReceiver(receiver) { (port: Int) async throws in
            // Direct mode: the outbox dispatcher schedules by the system clock, not the injected one.
            let configuration = testConfiguration(services: [testService("app", target: .url("http://127.0.0.1:\(port)/e"))], mode: .direct)
            try await withSidecar(configuration, options: fixed) { (sidecar: RunningSidecar) async throws in
                let before = clock.read().seconds
                let first = TestEvent.body(eventID: "evt_clock_first")
                #expect(try await sendSigned(first, to: sidecar, timestamp: before).status == 200)
                for jump in [Duration.seconds(3600), .seconds(-2 * 86_400)] {
                    clock.advance(jump)
                    let now = clock.read().seconds
                    // A signature from before the jump is outside the window; one from the new now is inside.
                    let stale = try await sendSigned(TestEvent.body(), to: sidecar, timestamp: before)
                    #expect(stale.status == 401)
                    #expect(stale.code == "STALE_TIMESTAMP")
                    for offset: Int64 in [-300, 300] {
                        #expect(try await sendSigned(TestEvent.body(), to: sidecar, timestamp: now + offset).status == 200)
                    }
                    for offset: Int64 in [-301, 301] {
                        #expect(try await sendSigned(TestEvent.body(), to: sidecar, timestamp: now + offset).status == 401)
                    }
                    // An event seen before the jump is still a duplicate after it.
                    let replay = try await sendSigned(first, to: sidecar, timestamp: now)
                    #expect(replay.status == 200)
                    #expect(replay.json?["duplicate"] == true, "\(replay.body)")
                }
                // Whatever the clock did, every accepted event is delivered: 1 + 2 per jump.
                try await waitUntil("5 deliveries, not \(receiver.count)") { receiver.count == 5 }
            }
        }
    }
}

/// `chattr -i` without waiting on the cooperative pool (for `defer`).
func clearImmutable(_ paths: [String]) {
    _ = try? Child("/usr/bin/chattr", ["-i"] + paths, environment: [:]).waitForExit()
}
