import KoraSidecarCore

/// How a store protects identity data: bodies sealed before they are written, and kept no longer
/// than needed once their deliveries ended.
package struct DataProtection: Sendable {
    /// Seals event bodies, their headers and quarantined payloads; nil keeps them as they are
    /// (the in-memory store of the tests, which never writes to disk).
    package var sealer: PayloadSealer?
    /// How long a body is kept once every delivery of its event was delivered.
    package var payloadRetention = Duration.seconds(86_400)
    /// How long a body is kept once a delivery of its event is dead.
    package var deadRetention = Duration.seconds(7 * 86_400)

    package init(sealer: PayloadSealer?, payloadRetention: Duration = .seconds(86_400), deadRetention: Duration = .seconds(7 * 86_400)) {
        self.sealer = sealer
        self.payloadRetention = payloadRetention
        self.deadRetention = deadRetention
    }

    /// Stores nothing sealed (tests).
    package static let plain = DataProtection(sealer: nil)

    /// The columns an event's body is written to: sealed as one value bound to the event's id, the
    /// plain columns left empty.
    func columns(for event: KoraEvent) -> BodyColumns {
        let headers = HeaderList.encode(event.originalHeaders)
        guard let sealer else {
            return BodyColumns(normalized: event.normalizedBody, original: event.originalBody, headers: headers, sealed: nil, keyID: nil)
        }
        let plaintext = Frames.join([event.normalizedBody, event.originalBody, Array(headers.utf8)])
        return BodyColumns(
            normalized: [], original: [], headers: "[]", sealed: sealer.seal(plaintext, binding: "event:" + event.id), keyID: sealer.sealingKeyID)
    }

    /// The columns a quarantined payload's body and headers are written to.
    func columns(for payload: QuarantinedPayload) -> BodyColumns {
        let headers = HeaderList.encode(payload.headers.sorted { $0.key < $1.key }.map { ($0.key, $0.value) })
        guard let sealer else { return BodyColumns(normalized: payload.body, original: [], headers: headers, sealed: nil, keyID: nil) }
        let plaintext = Frames.join([payload.body, Array(headers.utf8)])
        return BodyColumns(
            normalized: [], original: [], headers: "[]", sealed: sealer.seal(plaintext, binding: "quarantine"), keyID: sealer.sealingKeyID)
    }

    /// Fills `event`'s body from its stored columns; the problem when it cannot.
    func open(_ columns: BodyColumns, state: BodyState, into event: inout KoraEvent) -> BodyProblem? {
        if let problem = BodyProblem(state: state) { return problem }
        guard let sealed = columns.sealed, let keyID = columns.keyID else {
            event.normalizedBody = columns.normalized
            event.originalBody = columns.original
            event.originalHeaders = HeaderList.decode(columns.headers)
            return nil
        }
        do {
            let parts = try Frames.split(try opening(sealed, keyID: keyID, binding: "event:" + event.id), count: 3)
            event.normalizedBody = parts[0]
            event.originalBody = parts[1]
            event.originalHeaders = HeaderList.decode(String(decoding: parts[2], as: UTF8.self))
            return nil
        } catch {
            return .unreadable(error)
        }
    }

    /// Fills `payload`'s body and headers from its stored columns; the problem when it cannot.
    func open(_ columns: BodyColumns, state: BodyState, into payload: inout QuarantinedPayload) -> BodyProblem? {
        if let problem = BodyProblem(state: state) { return problem }
        var body = columns.normalized
        var headers = columns.headers
        if let sealed = columns.sealed, let keyID = columns.keyID {
            do {
                let parts = try Frames.split(try opening(sealed, keyID: keyID, binding: "quarantine"), count: 2)
                body = parts[0]
                headers = String(decoding: parts[1], as: UTF8.self)
            } catch {
                return .unreadable(error)
            }
        }
        payload.body = body
        payload.headers = Dictionary(HeaderList.decode(headers), uniquingKeysWith: { $1 })
        return nil
    }

    private func opening(_ sealed: [UInt8], keyID: String, binding: String) throws(UnreadablePayload) -> [UInt8] {
        guard let sealer else { throw UnreadablePayload(keyID: keyID, reason: .keyMissing) }
        return try sealer.open(sealed, keyID: keyID, binding: binding)
    }
}

/// An event's or quarantined payload's stored body: plain columns, or one sealed value and its key.
struct BodyColumns {
    var normalized: [UInt8]
    var original: [UInt8]
    var headers: String
    var sealed: [UInt8]?
    var keyID: String?
}

/// What is left of a stored body.
package enum BodyState: String, Sendable, CaseIterable {
    /// Kept (sealed).
    case kept
    /// Deleted after `storage.payloadRetention` or `storage.deadRetention`.
    case expired
    /// Deleted by `erase`.
    case erased
}

/// Why a stored body cannot be had.
package enum BodyProblem: Error, Sendable, Equatable, CustomStringConvertible {
    case expired
    case erased
    case unreadable(UnreadablePayload)

    init?(state: BodyState) {
        switch state {
        case .kept: return nil
        case .expired: self = .expired
        case .erased: self = .erased
        }
    }

    /// The state operators see: `expired`, `erased` or `unreadable`.
    package var state: String {
        switch self {
        case .expired: "expired"
        case .erased: "erased"
        case .unreadable: "unreadable"
        }
    }

    package var description: String {
        switch self {
        case .expired: "the event's body was deleted after its retention (storage.payloadRetention or storage.deadRetention)"
        case .erased: "the event's body was erased"
        case .unreadable(let why): "the event's body is \(why)"
        }
    }
}

/// Several byte strings as one: each preceded by its length (4 bytes, big-endian).
enum Frames {
    static func join(_ parts: [[UInt8]]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(parts.reduce(0) { $0 + $1.count + 4 })
        for part in parts {
            let count = UInt32(part.count)
            out += [UInt8(count >> 24), UInt8(count >> 16 & 0xFF), UInt8(count >> 8 & 0xFF), UInt8(count & 0xFF)]
            out += part
        }
        return out
    }

    static func split(_ bytes: [UInt8], count: Int) throws(UnreadablePayload) -> [[UInt8]] {
        var parts: [[UInt8]] = []
        var index = 0
        while parts.count < count {
            guard index + 4 <= bytes.count else { throw UnreadablePayload(keyID: "", reason: .tampered) }
            let length = bytes[index..<index + 4].reduce(0) { $0 << 8 | Int($1) }
            index += 4
            guard index + length <= bytes.count else { throw UnreadablePayload(keyID: "", reason: .tampered) }
            parts.append(Array(bytes[index..<index + length]))
            index += length
        }
        return parts
    }
}
