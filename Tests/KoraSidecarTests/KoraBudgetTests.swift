import AsyncHTTPClient
import Foundation
import NIOConcurrencyHelpers
import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

/// One Kora key, many services: the budget in front of Kora, fair between services, with the
/// simulator's rate limit as the Kora that would refuse (windows of 3 s instead of a minute).
@Suite("Kora budget")
struct KoraBudgetTests {
    /// A sidecar whose proxy shares a budget of `perWindow` calls each `window` seconds, in front
    /// of a Kora allowing 6 calls each `window` seconds.
    /// A sidecar whose budget counts `perWindow` calls per `window` seconds (or per `sidecarWindow`,
    /// when it must keep further from Kora's window edges than a loaded machine's delays), in front
    /// of the stand-in allowing six calls per `window`.
    func withBudget(
        perWindow: Int?, window: Int64 = 3, sidecarWindow: Int64? = nil, koraClock: @escaping @Sendable () -> UnixTime = UnixTime.now,
        maxWait: Duration, services: [ServiceConfiguration], _ body: @Sendable @escaping (ProxySidecar) async throws -> Void
    ) async throws {
        try await withSimulator({
            $0.rateLimitPerMinute = 6
            $0.rateLimitWindowSeconds = window
            $0.clock = koraClock
        }) { _, base in
            var configuration = proxyConfiguration(koraBaseURL: base, services: services)
            configuration.kora.rateLimit.perMinute = perWindow
            configuration.kora.rateLimit.maxWait = maxWait
            var options = SidecarOptions()
            options.koraProxy.budgetWindow = .seconds(sidecarWindow ?? window)
            try await withProxySidecar(configuration, options: options, body)
        }
    }

    /// The calls waiting for a turn, as the metric says.
    static func waiting(_ metrics: SidecarMetrics) -> Double? {
        var buffer: [UInt8] = []
        metrics.registry.emit(into: &buffer)
        let line = String(decoding: buffer, as: UTF8.self).split(separator: "\n").first { $0.hasPrefix("kora_sidecar_kora_calls_waiting ") }
        return line.flatMap { Double($0.split(separator: " ")[1]) }
    }

    @Test func aCallWhoseCallerWentAwayLeavesTheQueueAndTakesNoTurn() async throws {
        let metrics = SidecarMetrics()
        let ledger = CountingLedger()
        // The next turn comes once the window has passed since the first call: long enough that the
        // calls are still waiting when their counts are read on a loaded machine (2 s was not, once).
        let budget = KoraBudget(perMinute: 1, maxWait: .seconds(30), window: .seconds(8), ledger: ledger, metrics: metrics)
        func waiting() -> Double? { Self.waiting(metrics) }
        try await budget.acquire(service: "app", share: 1)
        let gone = Task { try await budget.acquire(service: "app", share: 1) }
        try await waitUntil("the first call to wait") { waiting() == 1 }
        let next = Task { try await budget.acquire(service: "app", share: 1) }
        try await waitUntil("the second call to wait") { waiting() == 2 }
        // Its caller went away: it leaves at once, instead of waiting out the window and taking the turn.
        gone.cancel()
        await #expect(throws: CancellationError.self) { try await gone.value }
        #expect(waiting() == 1)
        try await next.value
        #expect(waiting() == 0)
        // Two turns were taken, the first call's and the next one's: none was spent on the call that went
        // away (the next call would have got the turn after, maxWait being far longer than the window).
        #expect(await ledger.turnsTaken == 2)
    }

    /// The budget's turns, counted as the ledger grants them.
    actor CountingLedger: BudgetLedger {
        private let ledger = LocalBudgetLedger()
        private(set) var turnsTaken = 0

        func take(perWindow: Int?, window: Duration, at now: UnixTime) async throws -> BudgetTurn {
            let turn = await ledger.take(perWindow: perWindow, window: window, at: now)
            if turn.nextTurn == nil { turnsTaken += 1 }
            return turn
        }

        func hold(until: UnixTime) async throws { await ledger.hold(until: until) }
    }

    @Test func turnsTakenBeforeTheWallClockSteppedBackDoNotFillTheWindow() async throws {
        let ledger = LocalBudgetLedger()
        let now = UnixTime(milliseconds: 1_800_000_000_000)
        for _ in 0..<2 { #expect(await ledger.take(perWindow: 2, window: .seconds(60), at: now).nextTurn == nil) }
        #expect(await ledger.take(perWindow: 2, window: .seconds(60), at: now).nextTurn == now.adding(.seconds(60)))
        // An hour back, the turns count as taken then: the next comes a window later, not an hour.
        let back = now.adding(.seconds(-3600))
        #expect(await ledger.take(perWindow: 2, window: .seconds(60), at: back).nextTurn == back.adding(.seconds(60)))
        #expect(await ledger.take(perWindow: 2, window: .seconds(60), at: back.adding(.seconds(60))).nextTurn == nil)
        // Kora's hold of 30 s, then the clock ten minutes back: 30 s at most still, not ten and a half minutes.
        let held = LocalBudgetLedger()
        await held.hold(until: UnixTime.now().adding(.seconds(30)))
        let earlier = UnixTime.now().adding(.seconds(-600))
        let wait = try #require(await held.take(perWindow: nil, window: .seconds(60), at: earlier).nextTurn)
        #expect(wait > earlier && wait <= earlier.adding(.seconds(30)))
    }

    /// Whether `service` gets a turn from `budget` (within its maxWait).
    static func taken(_ budget: KoraBudget, _ service: String) async -> Bool {
        do {
            try await budget.acquire(service: service, share: 1)
            return true
        } catch {
            return false
        }
    }

    @Test func aServiceThatCalledWithinTheWindowHasATurnHeldForIt() async throws {
        let budget = KoraBudget(perMinute: 10, maxWait: .milliseconds(300), metrics: SidecarMetrics())
        // The rare service calls first; the flood then spends all but the turn held for it, not half.
        #expect(await Self.taken(budget, "rare"))
        var flood: [Bool] = []
        for _ in 0..<10 { flood.append(await Self.taken(budget, "flood")) }
        #expect(flood == Array(repeating: true, count: 8) + [false, false])
        // The turn held is the rare service's when it calls again, at once.
        #expect(await Self.taken(budget, "rare"))
        // Alone, a service may take every turn of the window.
        let alone = KoraBudget(perMinute: 4, maxWait: .milliseconds(300), metrics: SidecarMetrics())
        for _ in 0..<4 { try await alone.acquire(service: "flood", share: 1) }
    }

    @Test func aCallThatJoinsTheWaitGetsTheTurnHeldForItAtOnce() async throws {
        // maxWait is longer than the window, so that the flood's call waits for its turn.
        let metrics = SidecarMetrics()
        let budget = KoraBudget(perMinute: 4, maxWait: .seconds(120), metrics: metrics)
        #expect(await Self.taken(budget, "rare"))
        // The flood takes what is not held, and then waits: its next turn is a window away.
        #expect(await Self.taken(budget, "flood"))
        #expect(await Self.taken(budget, "flood"))
        let waiting = Task { await Self.taken(budget, "flood") }
        try await waitUntil("the flood's call to wait") { Self.waiting(metrics) == 1 }
        // The rare service's call joins the wait and gets its held turn, the flood's still waiting.
        #expect(await Self.taken(budget, "rare"))
        #expect(Self.waiting(metrics) == 1)
        waiting.cancel()
        #expect(await waiting.value == false)
    }

    @Test func aCallToldWhenToComeBackIsToldTheLaterOfKorasHoldAndTheWindow() async throws {
        let now = UnixTime.now()
        let ledger = LocalBudgetLedger()
        for _ in 0..<2 { #expect(await ledger.take(perWindow: 2, window: .seconds(60), at: now).nextTurn == nil) }
        await ledger.hold(until: now.adding(.seconds(5)))
        // Kora's hold ends in 5 s, but the window's next turn is a minute away: that is when.
        #expect(await ledger.take(perWindow: 2, window: .seconds(60), at: now.adding(.seconds(1))).nextTurn == now.adding(.seconds(60)))
        let url = Secret(try await PostgresServer.shared().createDatabase())
        let store = try PostgresStore(url: url, logger: quietLogger, operationTimeout: .seconds(5) * Sanitizer.slowdown, protection: .sealedForTests)
        let running = Task { await store.run() }
        defer { running.cancel() }
        try await store.waitUntilMigrated(timeout: .seconds(60))
        for _ in 0..<2 { #expect(try await store.take(perWindow: 2, window: .seconds(60), at: now).nextTurn == nil) }
        try await store.hold(until: now.adding(.seconds(5)))
        #expect(try await store.take(perWindow: 2, window: .seconds(60), at: now.adding(.seconds(1))).nextTurn == now.adding(.seconds(60)))
        // Told at once, when Kora's hold ends sooner than the window's next turn.
        let budget = KoraBudget(perMinute: 1, maxWait: .milliseconds(200), window: .seconds(30), metrics: SidecarMetrics())
        try await budget.acquire(service: "app", share: 1)
        await budget.observe(limit: nil, remaining: "0", reset: "\(UnixTime.now().seconds + 1)")
        do {
            try await budget.acquire(service: "app", share: 1)
            Issue.record("the second call got a turn")
        } catch let refusal as KoraBudget.Refusal {
            #expect(refusal.retryAfter > .seconds(20), "\(refusal.retryAfter)")
        }
        // Two calls wait for the one turn the window frees (4.25 s away, within maxWait); the one that
        // does not get it waits in vain, and is told when the next is (8.5 s from the start), not "in a second".
        let shared = KoraBudget(perMinute: 1, maxWait: .seconds(6), window: .seconds(4), metrics: SidecarMetrics())
        try await shared.acquire(service: "app", share: 1)
        async let first: Duration? = Self.refusal(shared)
        async let second: Duration? = Self.refusal(shared)
        let refusals = await [first, second].compactMap { $0 }
        #expect(refusals.count == 1)
        #expect(refusals.allSatisfy { $0 > .milliseconds(1500) }, "\(refusals)")
    }

    /// How long a refused call was told to wait; nil when it got a turn.
    static func refusal(_ budget: KoraBudget) async -> Duration? {
        do {
            try await budget.acquire(service: "app", share: 1)
            return nil
        } catch {
            return (error as? KoraBudget.Refusal)?.retryAfter ?? .zero
        }
    }

    @Test func aServiceThatFloodsCannotStarveOneThatCallsRarely() async throws {
        let flood = appService(name: "flood", token: "token-flood")
        let rare = appService(name: "rare", token: "token-rare")
        // The sidecar's window a second longer than Kora's: a call held up on a loaded machine between
        // its turn and Kora still lands in a window of its own (Kora refused some in a full run).
        try await withBudget(perWindow: 6, sidecarWindow: 4, maxWait: .seconds(12), services: [flood, rare]) { sidecar in
            let url = sidecar.internalURL("/api/v1/idv/document-types?country=US")
            // A client of its own per service, each free to have every call in flight at once.
            let clients = ["token-flood": Self.client(), "token-rare": Self.client()]
            func call(_ token: String) async throws -> HTTPAnswer {
                var request = HTTPClientRequest(url: url)
                request.headers.add(name: "Authorization", value: "Bearer \(token)")
                let response = try await clients[token]!.execute(request, timeout: .seconds(30))
                let body = try await response.body.collect(upTo: 1 << 20)
                return HTTPAnswer(status: Int(response.status.code), headers: response.headers, bytes: Array(body.readableBytesView))
            }
            // Shut down on every path: a client left running traps in its deinit, and takes every other test with it.
            defer { for client in clients.values { client.shutdown(queue: .global()) { _ in } } }
            // The flood's connections open first: twenty of its calls must be waiting at once, and
            // turns free three every two seconds, so on a loaded machine thirty connections opened
            // with the calls arrived too slowly for that. Forty calls keep twenty waiting even when
            // they take nine seconds to arrive (a full run on two cores).
            try await withThrowingTaskGroup(of: Void.self) { group in
                for _ in 0..<40 {
                    group.addTask {
                        let response = try await clients["token-flood"]!.execute(HTTPClientRequest(url: sidecar.internalURL("/healthz")), timeout: .seconds(30))
                        _ = try await response.body.collect(upTo: 1 << 16)
                    }
                }
                try await group.waitForAll()
            }
            let answers = try await withThrowingTaskGroup(of: (String, HTTPAnswer).self) { group in
                for _ in 0..<40 { group.addTask { ("flood", try await call("token-flood")) } }
                try await waitUntil("the flood to wait") {
                    try await metric("kora_sidecar_kora_calls_waiting", in: sidecar).map { $0 >= 20 } ?? false
                }
                for _ in 0..<5 { group.addTask { ("rare", try await call("token-rare")) } }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            // The rare service's calls all went, taking turns with the flood's.
            #expect(answers.filter { $0.0 == "rare" }.allSatisfy { $0.1.status == 200 })
            let refused = answers.filter { $0.1.status == 429 }
            #expect(!refused.isEmpty)
            #expect(refused.allSatisfy { $0.0 == "flood" && $0.1.code == "RATE_LIMITED" && $0.1.header("Retry-After") != nil })
            // Kora itself never had to refuse: every call that reached it was answered 2xx.
            let metrics = try await get(sidecar.internalURL("/metrics")).body
            #expect(!metrics.contains(#"kora_sidecar_kora_requests_total{status_class="4xx"}"#))
            #expect(metrics.contains("kora_sidecar_kora_calls_refused_total \(refused.count)"))
        }
    }

    @Test func postgresReplicasShareOneBudget() async throws {
        let url = Secret(try await PostgresServer.shared().createDatabase())
        var stores: [PostgresStore] = []
        for _ in 0..<2 {
            let store = try PostgresStore(url: url, logger: quietLogger, operationTimeout: .seconds(5) * Sanitizer.slowdown, protection: .sealedForTests)
            Task { await store.run() }
            try await store.waitUntilMigrated(timeout: .seconds(60))
            stores.append(store)
        }
        let replicas = stores
        try await withSimulator({
            $0.rateLimitPerMinute = 6
            $0.rateLimitWindowSeconds = 3
        }) { _, base in
            var shared = proxyConfiguration(koraBaseURL: base, services: [appService()])
            shared.kora.rateLimit.perMinute = 6
            shared.kora.rateLimit.maxWait = .milliseconds(500)
            let configuration = shared
            let options = replicas.map { store in
                var options = SidecarOptions()
                options.store = store
                // A second longer than Kora's fixed windows: a turn taken through PostgreSQL at the end of
                // one of them may reach Kora in the next on a loaded machine (a full run saw Kora refuse).
                options.koraProxy.budgetWindow = .seconds(4)
                return options
            }
            try await withProxySidecar(configuration, options: options[0]) { first in
                try await withProxySidecar(configuration, options: options[1]) { second in
                    // Six calls on each replica at once: one budget of six between them, not six each.
                    let statuses = try await withThrowingTaskGroup(of: Int.self) { group in
                        for index in 0..<12 {
                            let sidecar = index % 2 == 0 ? first : second
                            group.addTask {
                                try await SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
                                    .call(.GET, "/document-types?country=US").status
                            }
                        }
                        return try await group.reduce(into: []) { $0.append($1) }
                    }
                    // Six go at once; the rest wait for the window to slide (how many get a turn within
                    // maxWait depends on the machine's speed) or are refused by the sidecar itself.
                    #expect(statuses.filter { $0 == 200 }.count >= 6, "\(statuses)")
                    #expect(statuses.allSatisfy { $0 == 200 || $0 == 429 }, "\(statuses)")
                    // Had each replica counted its own six, Kora (six per window) would have refused some.
                    for sidecar in [first, second] {
                        let metrics = try await get(sidecar.internalURL("/metrics")).body
                        #expect(!metrics.contains(#"kora_sidecar_kora_requests_total{status_class="4xx"}"#))
                    }
                }
            }
        }
    }

    static func client() -> HTTPClient {
        var configuration = HTTPClient.Configuration(redirectConfiguration: .disallow, timeout: .init(connect: .seconds(5), read: .seconds(60)))
        configuration.connectionPool = .init(idleTimeout: .seconds(5), concurrentHTTP1ConnectionsPerHostSoftLimit: 64)
        return HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
    }

    @Test func withoutAConfiguredLimitTheBudgetIsLearnedFromKora() async throws {
        // Kora's clock stands still at the start of the next hour: its window cannot roll over between
        // the calls and give its turns back (a real clock crossing the hour did, in a full run), and
        // its reset, which the sidecar waits for, is an hour or more ahead.
        let nextHour = UnixTime(milliseconds: (UnixTime.now().seconds / 3600 + 1) * 3_600_000)
        try await withBudget(
            perWindow: nil, window: 3600, koraClock: { nextHour }, maxWait: .milliseconds(200), services: [appService()]
        ) { sidecar in
            let sdk = SDKStyleClient(baseURL: sidecar.internalURL("/api/v1/idv"), apiKey: ProxySecrets.appToken)
            // Kora says how many are left; once it says none, the sidecar holds calls back itself.
            var statuses: [Int] = []
            var codes: [String?] = []
            for _ in 0..<8 {
                let answer = try await sdk.call(.GET, "/document-types?country=US")
                statuses.append(answer.status)
                codes.append(answer.code)
            }
            #expect(statuses.prefix(6).allSatisfy { $0 == 200 }, "\(statuses)")
            #expect(statuses.suffix(2).allSatisfy { $0 == 429 }, "\(statuses)")
            #expect(codes.suffix(2).allSatisfy { $0 == "RATE_LIMITED" }, "\(codes)")
        }
    }

    @Test func aLimitNoPlanHasDoesNotStopTheProcess() async throws {
        // Int.max as Kora's limit stopped the process: a service whose own call had left the window
        // while it waited for Kora's hold, granted its turn while another's call was in it, had a
        // share of all of it, which overflowed an Int.
        let budget = KoraBudget(perMinute: nil, maxWait: .seconds(10), window: .seconds(1), metrics: SidecarMetrics())
        let reset = UnixTime.now().seconds + 3
        await budget.observe(limit: "\(Int.max)", remaining: "0", reset: "\(reset)")
        let first = Task { try await budget.acquire(service: "a", share: 1) }
        // The scenario's timing: b calls half a second before the hold ends, when a's call (2 to 3 s
        // earlier) has left the window (1.25 s) and b's has not.
        try await Task.sleep(for: .milliseconds(reset * 1000 - 500 - UnixTime.now().milliseconds))
        try await budget.acquire(service: "b", share: 1)
        try await first.value
    }

    @Test(arguments: ["\(Int64.max)", "\(Int64.min)", "\(UnixTime.now().milliseconds)"])
    func aResetNoKoraWindowHasHoldsCallsTwoMinutesAtMost(reset: String) async throws {
        // Beyond Int64 as milliseconds, the reset stopped the process; in milliseconds instead of
        // seconds, it held every call for fifty thousand years.
        let budget = KoraBudget(perMinute: nil, maxWait: .milliseconds(10), metrics: SidecarMetrics())
        await budget.observe(limit: nil, remaining: "0", reset: reset)
        do {
            try await budget.acquire(service: "app", share: 1)
            #expect(reset == "\(Int64.min)", "a reset in the future holds the call")
        } catch let refusal as KoraBudget.Refusal {
            #expect(refusal.retryAfter <= KoraBudget.longestHold && refusal.retryAfter > KoraBudget.longestHold - .seconds(5))
        }
    }
}
