extension UInt8 {
    /// `0` to `9` in ASCII: what every parser of numbers on the wire reads.
    package var isASCIIDigit: Bool { self >= UInt8(ascii: "0") && self <= UInt8(ascii: "9") }

    /// `A` to `Z` and `a` to `z` in ASCII.
    package var isASCIILetter: Bool { (self | 0x20) >= UInt8(ascii: "a") && (self | 0x20) <= UInt8(ascii: "z") }
}
