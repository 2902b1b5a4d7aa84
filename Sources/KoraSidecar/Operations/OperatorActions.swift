import KoraSidecarCore
import Logging

/// What the `deliveries` command and the admin API both do over the store, so that the two say
/// the same thing in the same shape.
package enum OperatorActions {
    /// What an operator may list.
    package enum Listing: String, Sendable, CaseIterable {
        case pending, delivered, dead, quarantined, unrouted

        /// The accepted values, for error messages.
        package static let choices = "pending, delivered, dead, quarantined or unrouted"
    }

    /// The newest `limit` entries of `listing` (every delivery when nil), of `service` when given,
    /// as operators see them.
    static func list(_ listing: Listing?, service: String? = nil, limit: Int, store: any SidecarStore) async throws -> JSONValue {
        try await page(listing, filter: DeliveryFilter(statuses: [], service: service), before: nil, limit: limit, store: store).entries
    }

    /// One page of `listing`: deliveries that `filter` selects, older than `before`, and the
    /// `before` of the next page when there may be one (quarantined and unrouted are one page).
    static func page(
        _ listing: Listing?, filter: DeliveryFilter, before: Int64?, limit: Int, store: any SidecarStore
    ) async throws -> (entries: JSONValue, next: Int64?) {
        var filter = filter
        switch listing {
        case .quarantined: return (.array(try await store.quarantined(limit: limit).map(\.listingJSON)), nil)
        case .unrouted: return (.array(try await store.unrouted(limit: limit).map(\.listingJSON)), nil)
        case .pending: filter.statuses = [.pending]
        case .delivered: filter.statuses = [.delivered]
        case .dead: filter.statuses = [.dead]
        case nil: filter.statuses = []
        }
        let deliveries = try await store.deliveries(DeliveryQuery(filter: filter, before: before, limit: limit))
        return (.array(deliveries.map(\.listingJSON)), deliveries.count == limit ? deliveries.last?.id : nil)
    }

    /// One delivery with its attempts and its body as `services` received it (format and redaction),
    /// or why the body is gone.
    static func show(_ detail: DeliveryDetail, services: [DeliveryService]) -> JSONValue {
        guard case .object(var members) = detail.listingJSON else { return .null }
        switch detail.event {
        case .success(let event):
            let body = services.first { $0.name == detail.summary.service }.map { EventSender.body(of: event, for: $0) } ?? event.normalizedBody
            members += [.init("bodyState", "kept"), .init("body", .optional(body.map { String(decoding: $0, as: UTF8.self) }))]
        case .failure(let problem):
            members += [.init("bodyState", .string(problem.state)), .init("body", .null), .init("bodyProblem", .string(problem.description))]
        }
        return .object(members)
    }

    /// The verifications whose kept events name `externalID`, and the events that name it but are
    /// about no verification (a fraud alert may carry only the person's id), read a page at a time.
    private static func subjects(of externalID: String, in store: any SidecarStore) async throws -> (verificationIDs: [String], eventIDs: [String]) {
        var verifications = Set<String>()
        var events = Set<String>()
        var after: Int64 = 0
        while true {
            let page = try await store.keptEvents(after: after, limit: 500)
            for body in page.bodies {
                guard case .event(let eventID, let verificationID) = body.owner, let json = try? JSONParser.parse(body.body),
                    [json["verification"]?["externalId"], json["fraudAlert"]?["externalId"]].contains(where: { $0?.text == externalID })
                else { continue }
                if let verificationID { verifications.insert(verificationID) } else { events.insert(eventID) }
            }
            guard let last = page.last else { return (verifications.sorted(), events.sorted()) }
            after = last
        }
    }

    /// Whose data an operator erases.
    package enum ErasureSubject: Sendable {
        case verification(String)
        /// The app's own id for a person: every verification whose stored event names it.
        case externalID(String)

        /// The id it names.
        var value: String {
            switch self {
            case .verification(let id), .externalID(let id): id
            }
        }
    }

    /// Erases everything stored about `subject`, in one transaction, and logs one audit line that
    /// names the verifications, never the data (an external id is data: it is not logged).
    static func erase(_ subject: ErasureSubject, store: any SidecarStore, logger: Logger) async throws -> ErasureReport {
        let verificationIDs: [String]
        var eventIDs: [String] = []
        switch subject {
        case .verification(let id):
            verificationIDs = [id]
        case .externalID(let externalID):
            (verificationIDs, eventIDs) = try await subjects(of: externalID, in: store)
        }
        // Quarantined payloads could not be parsed, and idempotency records hold Kora's answer: they
        // go when they name the subject or one of its verifications, however the sender escaped it
        // (`\u00e9`, `\/`). Quarantined ones are read as their strings say; stored answers, which the
        // store can only search, are searched in each common spelling.
        let names = [subject.value] + verificationIDs
        let said = names.map { [UInt8(ascii: "\"")] + Array($0.utf8) + [UInt8(ascii: "\"")] }
        let quarantineIDs = try await store.keptQuarantined().compactMap { body -> Int64? in
            guard case .quarantine(let id) = body.owner else { return nil }
            let unescaped = JSONStrings.unescaped(body.body)
            return said.contains(where: { unescaped.firstRange(of: $0) != nil }) ? id : nil
        }
        let mentions = names.flatMap(JSONStrings.spellings)
        let report = try await store.erase(verificationIDs: verificationIDs, eventIDs: eventIDs, quarantineIDs: quarantineIDs, mentions: mentions)
        logger.notice(
            "Erased stored data",
            metadata: [
                "verification.ids": "\(report.verificationIDs.joined(separator: ","))", "by": "\(subject.kind)",
                "erased.events": "\(report.events)", "erased.deliveries": "\(report.deliveries)",
                "erased.quarantined": "\(report.quarantined)", "erased.origins": "\(report.origins)",
                "erased.idempotency_keys": "\(report.idempotencyKeys)",
            ])
        return report
    }

    /// What a bulk retry selects: from the `deliveries retry` flags or the admin API's parameters.
    package struct RetrySelection: Sendable {
        /// What is retried: deliveries of these statuses, or unrouted events.
        package enum Scope: Sendable, Equatable {
            case deliveries([DeliveryStatus])
            case unrouted
        }

        package var scope: Scope
        /// The conditions (its statuses are the scope's).
        package var filter: DeliveryFilter
        package var dryRun: Bool

        /// `status` as an operator writes it: `dead`, `delivered` or `unrouted`.
        package init?(status: String, filter: DeliveryFilter = DeliveryFilter(statuses: []), dryRun: Bool = false) {
            let scope: Scope
            switch status {
            case "dead": scope = .deliveries([.dead])
            case "delivered": scope = .deliveries([.delivered])
            case "unrouted": scope = .unrouted
            default: return nil
            }
            self.init(scope: scope, filter: filter, dryRun: dryRun)
        }

        /// Sends an event again to the services that had it (delivered or dead): same id, next attempt number.
        package static func replay(eventID: String, service: String?) -> RetrySelection {
            RetrySelection(scope: .deliveries([.delivered, .dead]), filter: DeliveryFilter(statuses: [], service: service, eventID: eventID))
        }

        private init(scope: Scope, filter: DeliveryFilter, dryRun: Bool = false) {
            self.scope = scope
            self.filter = filter
            self.dryRun = dryRun
        }

        static let statusChoices = "dead, delivered or unrouted"
    }

    /// How many deliveries of `eventID` (to `service`) wait to be sent: a replay that found none
    /// delivered or dead may have been asked twice, the first one still queued.
    static func pendingDeliveries(ofEvent eventID: String, service: String?, store: any SidecarStore) async throws -> Int {
        try await store.deliveries(DeliveryQuery(filter: DeliveryFilter(statuses: [.pending], service: service, eventID: eventID), limit: 1000)).count
    }

    /// What retrying one delivery did.
    enum SingleRetry: Equatable {
        case requeued
        /// No such delivery, or it was delivered.
        case notFound
        /// Its event's body was deleted (retention or erasure): there is nothing to send.
        case bodyGone(BodyProblem)
    }

    /// Queues delivery `id` again now; when it cannot, says why (only a refusal reads the delivery).
    /// A body no configured key opens is retried: it opens once its key is back.
    static func retry(deliveryID id: Int64, store: any SidecarStore) async throws -> SingleRetry {
        if try await store.requeue(id: id, at: .now()) { return .requeued }
        if case .failure(let problem)? = try await store.delivery(id: id)?.event, problem == .expired || problem == .erased {
            return .bodyGone(problem)
        }
        return .notFound
    }

    /// What a bulk retry did, or would do.
    package struct RetryOutcome: Sendable {
        package var selection: RetrySelection
        /// Deliveries queued again, or unrouted events routed.
        package var selected: Int
        /// For unrouted events: the deliveries created and the events that still match no service.
        package var deliveries = 0
        package var stillUnrouted = 0
        /// Deliveries selected but left, because their event's body is gone (retention or erasure).
        package var bodyGone = 0

        /// The admin API's answer; a dry run's gives the times it counted between, to confirm with.
        var json: JSONValue {
            var members: [JSONMember] = [.init("dryRun", .bool(selection.dryRun))]
            if selection.dryRun {
                if let since = selection.filter.since { members.append(.init("since", .string(since.iso8601Milliseconds))) }
                if let until = selection.filter.until { members.append(.init("until", .string(until.iso8601Milliseconds))) }
            }
            switch selection.scope {
            case .deliveries:
                members.append(.init(selection.dryRun ? "wouldRequeue" : "requeued", .int(selected)))
                if bodyGone > 0 { members.append(.init("bodyGone", .int(bodyGone))) }
            case .unrouted:
                members += [
                    .init("routedEvents", .int(selected)), .init("deliveries", .int(deliveries)), .init("stillUnrouted", .int(stillUnrouted)),
                ]
            }
            return .object(members)
        }

        /// `dead ` or `delivered ` when one status was selected.
        private var statusWord: String {
            guard case .deliveries(let statuses) = selection.scope, statuses.count == 1 else { return "" }
            return statuses[0].rawValue + " "
        }

        /// The command's sentence.
        var sentence: String {
            let gone = bodyGone == 0 ? "" : " \(bodyGone) cannot be sent again: their body is gone (retention or erasure)."
            guard selection.dryRun, selected > 0, let until = selection.filter.until else { return action + gone }
            let since = selection.filter.since.map { " --since \($0.iso8601Milliseconds)" } ?? ""
            return action + gone + " To send exactly these, add\(since) --until \(until.iso8601Milliseconds) (events accepted later would be included)."
        }

        private var action: String {
            switch (selection.scope, selection.dryRun) {
            case (.deliveries, true): "\(selected) \(statusWord)deliveries would be queued again."
            case (.deliveries, false): "\(selected) \(statusWord)deliveries are queued again."
            case (.unrouted, true):
                "\(selected) unrouted events would be routed (\(deliveries) deliveries); \(stillUnrouted) would still match no service."
            case (.unrouted, false):
                "\(selected) unrouted events were routed (\(deliveries) deliveries queued); \(stillUnrouted) still match no service."
            }
        }
    }

    /// Retries what `selection` selects, now. A dry run counts what was accepted until now, and says
    /// so (``RetryOutcome/json``, ``RetryOutcome/sentence``): confirmed with that bound, the same
    /// deliveries are sent, not those of every event accepted since.
    static func retry(_ selection: RetrySelection, store: any SidecarStore, router: EventRouter) async throws -> RetryOutcome {
        var selection = selection
        if selection.dryRun {
            let now = UnixTime.now()
            selection.filter.until = min(selection.filter.until ?? now, now)
        }
        switch selection.scope {
        case .deliveries(let statuses):
            var filter = selection.filter
            filter.statuses = statuses
            // Without a service named, only the configured services' deliveries: one of a service the
            // configuration no longer has would stay pending for good, no worker sending it, its body
            // never deleted.
            var total = RequeueCount(selected: 0, bodyGone: 0)
            for service in filter.service.map({ [$0] }) ?? router.services.map(\.name) {
                filter.service = service
                let count = try await store.requeue(filter, at: .now(), dryRun: selection.dryRun)
                total.selected += count.selected
                total.bodyGone += count.bodyGone
            }
            return RetryOutcome(selection: selection, selected: total.selected, bodyGone: total.bodyGone)
        case .unrouted:
            let result = try await router.routeUnrouted(at: .now(), filter: selection.filter, dryRun: selection.dryRun)
            return RetryOutcome(
                selection: selection, selected: result.routedEvents, deliveries: result.deliveries, stillUnrouted: result.stillUnrouted)
        }
    }
}

extension OperatorActions.ErasureSubject {
    /// How the subject was named, for the audit line.
    var kind: String {
        switch self {
        case .verification: "verificationId"
        case .externalID: "externalId"
        }
    }
}

extension ErasureReport {
    /// The admin API's answer and the command's output.
    var json: JSONValue {
        [
            "verificationIds": .array(verificationIDs.map(JSONValue.string)), "events": .int(events), "deliveries": .int(deliveries),
            "quarantined": .int(quarantined), "origins": .int(origins), "idempotencyKeys": .int(idempotencyKeys),
        ]
    }
}
