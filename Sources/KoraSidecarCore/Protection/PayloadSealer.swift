import Crypto
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// One key of `storage.encryption.keys`: 32 bytes for AES-256-GCM, named by an id that is stored
/// beside each sealed row so that any configured key can open it.
package struct SealingKey: Sendable {
    package var id: String
    package var key: SymmetricKey

    package init(id: String, key: SymmetricKey) {
        self.id = id
        self.key = key
    }

    /// A key from its id and the base64 text of 32 bytes; nil when the text is not that.
    package init?(id: String, base64: String) {
        guard let bytes = Data(base64Encoded: base64), bytes.count == 32 else { return nil }
        self.init(id: id, key: SymmetricKey(data: bytes))
    }

    /// A new random key.
    package static func generate(id: String) -> SealingKey { SealingKey(id: id, key: SymmetricKey(size: .bits256)) }

    /// The key's bytes as base64, for the key file.
    package var base64: String {
        key.withUnsafeBytes { Data($0).base64EncodedString() }
    }
}

/// Seals identity data before it reaches the store and opens it when read: AES-256-GCM with the
/// first key; every key opens. The associated data binds a sealed value to its row (an event's
/// id), so a value copied into another row does not open.
package struct PayloadSealer: Sendable {
    /// The first seals, all open (rotation puts the new key first).
    package let keys: [SealingKey]

    package init(keys: [SealingKey]) {
        precondition(!keys.isEmpty, "a sealer needs a key")
        self.keys = keys
    }

    /// The id of the key that seals.
    package var sealingKeyID: String { keys[0].id }

    /// `plaintext` sealed with the first key: nonce, ciphertext and tag.
    package func seal(_ plaintext: [UInt8], binding context: String) -> [UInt8] {
        // Sealing with a 32-byte key and a random nonce cannot fail.
        let box = try! AES.GCM.seal(plaintext, using: keys[0].key, authenticating: Array(context.utf8))
        return Array(box.combined!)
    }

    /// Opens a value sealed under `keyID`.
    /// - Throws: ``UnreadablePayload`` when no configured key has that id, or the value does not open with it.
    package func open(_ sealed: [UInt8], keyID: String, binding context: String) throws(UnreadablePayload) -> [UInt8] {
        guard let key = keys.first(where: { $0.id == keyID }) else { throw UnreadablePayload(keyID: keyID, reason: .keyMissing) }
        do {
            let box = try AES.GCM.SealedBox(combined: sealed)
            return Array(try AES.GCM.open(box, using: key.key, authenticating: Array(context.utf8)))
        } catch {
            throw UnreadablePayload(keyID: keyID, reason: .tampered)
        }
    }
}

/// A stored value that cannot be opened: reported, never a crash.
package struct UnreadablePayload: Error, Sendable, Equatable, CustomStringConvertible {
    package enum Reason: Sendable, Equatable {
        /// No configured key has the id it was sealed with.
        case keyMissing
        /// The key is there but the value does not open (altered, or another key under the same id).
        case tampered
    }

    package var keyID: String
    package var reason: Reason

    package init(keyID: String, reason: Reason) {
        self.keyID = keyID
        self.reason = reason
    }

    package var description: String {
        switch reason {
        case .keyMissing: "sealed with key \"\(keyID)\", which storage.encryption.keys does not list"
        case .tampered: "sealed with key \"\(keyID)\" but does not open with it (altered, or another key under that id)"
        }
    }
}
