import Crypto
import HTTPTypes
import KoraSidecarCore
import NIOCore
import ServiceLifecycle

/// Verification creation that is safe to repeat: `Idempotency-Key` on `POST …/verifications` and
/// `POST /api/verifications`. Per service, the store keeps the key, a digest of the body and Kora's
/// answer for a day, so a repeat (after a time-out, on another replica, after a restart) gets the
/// first answer instead of a second verification.
extension KoraProxy {
    static let idempotencyKey = HTTPField.Name("Idempotency-Key")!
    /// How long a key is remembered.
    static let idempotencyRetention = Duration.seconds(24 * 3600)

    /// Sends a create once per `key` (every time without one).
    func createOnce(_ call: KoraCall, caller: ServiceIdentity.Caller, key: String?) async throws -> CreateAnswer {
        guard let key, !key.isEmpty else { return try await create(call, caller: caller) }
        guard key.utf8.count <= 255 else {
            throw SidecarHTTPError(.badRequest, code: "INVALID_REQUEST", message: "Idempotency-Key must be at most 255 bytes.")
        }
        let body = Array(call.body.readableBytesView)
        let digest = Hex.encode(SHA256.hash(data: body))
        let now = UnixTime.now()
        guard var record = try await store.claimIdempotencyKey(service: caller.name, key: key, digest: digest, at: now) else {
            return try await send(call, caller: caller, key: key)
        }
        guard record.digest == digest else {
            throw SidecarHTTPError(
                .unprocessableContent, code: "IDEMPOTENCY_KEY_REUSED",
                message: "This Idempotency-Key was used with another body; use a new key for a new verification.")
        }
        while true {
            // The same create in flight (here or on another replica): wait for its answer, as long as
            // a call can take from when it went in flight. One left by a process that was killed
            // (nobody sends it) is taken over once that time has passed, not a whole wait later.
            while record.state == .inFlight, UnixTime.now() < record.updatedAt.adding(idempotencyWait) {
                guard !Task.isShuttingDownGracefully else { throw SidecarHTTPError.stopping() }
                try await Task.sleep(for: .milliseconds(100))
                guard let current = try await store.idempotencyRecord(service: caller.name, key: key) else { break }
                record = current
            }
            switch record.state {
            case .answered(let status, let contentType, let stored):
                logger.info("Repeated create answered from the store", metadata: ["service": "\(caller.name)"])
                return CreateAnswer(
                    status: .init(code: status), headers: [:], contentType: contentType, body: stored,
                    verificationID: (200..<300).contains(status) ? Self.verificationID(in: stored) : nil)
            case .inFlight, .unknown:
                // One repeat takes the key over; the others wait for its answer, as for the first call's.
                let at = UnixTime(milliseconds: max(UnixTime.now().milliseconds, record.updatedAt.milliseconds + 1))
                if try await store.takeOverIdempotencyKey(service: caller.name, key: key, from: record, at: at) {
                    return try await sendAgain(call, caller: caller, key: key, externalID: Self.externalID(in: body), firstSentAt: record.createdAt)
                }
                // Taken over first by another repeat, or gone (erased, expired): claimed again from the start.
                guard let current = try await store.idempotencyRecord(service: caller.name, key: key) else {
                    return try await createOnce(call, caller: caller, key: key)
                }
                record = current
            }
        }
    }

    /// Sends the create under `key` again, taken over after its outcome was unknown: unless the first
    /// call, sent at `firstSentAt`, did create the verification of `externalID`.
    private func sendAgain(
        _ call: KoraCall, caller: ServiceIdentity.Caller, key: String, externalID: String?, firstSentAt: UnixTime
    ) async throws -> CreateAnswer {
        let found: CreateAnswer?
        do {
            found = try await createdSince(firstSentAt, externalID: externalID, caller: caller)
        } catch {
            // Nothing was sent: the next repeat takes the key over at once, not after the wait.
            try? await store.settleIdempotencyKey(service: caller.name, key: key, state: .unknown, at: .now())
            throw error
        }
        guard let found else { return try await send(call, caller: caller, key: key) }
        try await store.settleIdempotencyKey(service: caller.name, key: key, state: Self.state(of: found), at: .now())
        return found
    }

    /// Sends the create and records what became of it under `key`.
    private func send(_ call: KoraCall, caller: ServiceIdentity.Caller, key: String) async throws -> CreateAnswer {
        let answer: CreateAnswer
        do {
            answer = try await create(call, caller: caller)
        } catch {
            // Kora may or may not have created it: a repeat looks before creating.
            try? await store.settleIdempotencyKey(service: caller.name, key: key, state: .unknown, at: .now())
            throw error
        }
        // A 429 created nothing, and is no answer to keep for a day: a repeat looks, then sends again.
        let state: IdempotencyRecord.State = answer.status.code >= 500 || answer.status.code == 429 ? .unknown : Self.state(of: answer)
        try? await store.settleIdempotencyKey(service: caller.name, key: key, state: state, at: .now())
        return answer
    }

    /// The verification of `externalID` Kora created at or after `since` (less a minute for clock
    /// skew), as a create's answer, if there is one the caller may take (see below).
    private func createdSince(_ since: UnixTime, externalID: String?, caller: ServiceIdentity.Caller) async throws -> CreateAnswer? {
        guard let externalID else { return nil }
        let path = "/subjects/" + externalID.percentEncodingAllButUnreserved + "/verifications"
        let call = KoraCall(method: .get, path: path, query: nil, headers: [:], body: ByteBuffer())
        let response = try await client.send(call, service: caller.name)
        // No such person at Kora: nothing was created. Any answer that does not say what Kora holds
        // is no reason to create a second time: the caller retries later.
        if response.status.code == 404 { return nil }
        let unreadable = SidecarHTTPError.unavailable("Kora's list of the person's verifications could not be read; retry later.")
        guard response.status.code == 200, let list = try? JSONParser.parse(Array((try await client.collect(response, upTo: 1 << 20)).readableBytesView)),
            case .array(let verifications)? = list["verifications"] ?? list["data"]
        else { throw unreadable }
        let earliest = since.milliseconds - 60_000
        // The latest one created since the first call that the caller created through the sidecar, or
        // that no service did if the caller could list it itself. Never another service's (the same
        // person, signing up through two services: taking it would move its events away from that
        // service); one of unknown origin might be anyone's, so not for a service that sees only its
        // own verifications or may not list the person's. One whose time cannot be read might be it:
        // the answer then waits for a readable list.
        let takesUnknown = !caller.onlyOwnVerifications && caller.may("GET", path)
        var latest: (id: String, at: Int64, verification: JSONValue)?
        for verification in verifications {
            guard let id = verification["id"]?.text else { continue }
            let at = (verification["createdAt"] ?? verification["created_at"])?.text.flatMap { UnixTime.parse(dateOrTime: $0) }?.milliseconds
            if let at, at < earliest || at <= latest?.at ?? .min { continue }
            let origin = try await origins.origin(of: id)
            guard origin == caller.name || (origin == nil && takesUnknown) else { continue }
            guard let at else {
                logger.warning(
                    "Kora listed a verification without a readable createdAt; the repeated create waits",
                    metadata: ["service": "\(caller.name)", "verification.id": "\(id)"])
                throw unreadable
            }
            latest = (id, at, verification)
        }
        if let (id, _, found) = latest {
            await origins.record(id, service: caller.name)
            // Another service's record came first (the first is kept): not the caller's to take.
            guard try await origins.origin(of: id) == caller.name else { return nil }
            logger.notice(
                "Repeated create found the verification the first call created", metadata: ["service": "\(caller.name)", "verification.id": "\(id)"])
            return CreateAnswer(status: .created, headers: [:], contentType: "application/json", body: JSONWriter.encode(found), verificationID: id)
        }
        return nil
    }

    private static func state(of answer: CreateAnswer) -> IdempotencyRecord.State {
        .answered(status: answer.status.code, contentType: answer.contentType, body: answer.body)
    }

    /// `externalId` (or `external_id`) of a create's body.
    static func externalID(in body: [UInt8]) -> String? {
        guard let value = try? JSONParser.parse(body) else { return nil }
        return (value["externalId"] ?? value["external_id"])?.text
    }
}
