/// Short random identifiers for sample events, simulated verifications and demo secrets.
package enum RandomID {
    /// Twelve random lowercase hex digits.
    package static func make() -> String {
        Hex.encode((0..<6).map { _ in UInt8.random(in: 0...255) })
    }
}
