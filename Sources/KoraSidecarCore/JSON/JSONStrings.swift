/// What JSON text says inside its strings, read leniently: for finding a value in bytes that may
/// not parse (a quarantined payload), however its sender escaped it.
package enum JSONStrings {
    /// `bytes` with every string's escapes decoded (`\u00e9` as `é`, `\/` as `/`, a lone surrogate as
    /// U+FFFD) and everything else, its quotes included, as it was. Never fails: a broken escape stays.
    package static func unescaped(_ bytes: [UInt8]) -> [UInt8] {
        var output: [UInt8] = []
        output.reserveCapacity(bytes.count)
        var inString = false
        var index = 0
        while index < bytes.count {
            let byte = bytes[index]
            index += 1
            guard inString, byte == UInt8(ascii: "\\"), index < bytes.count else {
                if byte == UInt8(ascii: "\"") { inString.toggle() }
                output.append(byte)
                continue
            }
            let escape = bytes[index]
            index += 1
            switch escape {
            case UInt8(ascii: "b"): output.append(0x08)
            case UInt8(ascii: "f"): output.append(0x0C)
            case UInt8(ascii: "n"): output.append(0x0A)
            case UInt8(ascii: "r"): output.append(0x0D)
            case UInt8(ascii: "t"): output.append(0x09)
            case UInt8(ascii: "u"):
                guard var code = Hex.value4(bytes, at: index) else {
                    output += [UInt8(ascii: "\\"), escape]
                    continue
                }
                index += 4
                if (0xD800...0xDBFF).contains(code), index + 1 < bytes.count, bytes[index] == UInt8(ascii: "\\"),
                    bytes[index + 1] == UInt8(ascii: "u"), let low = Hex.value4(bytes, at: index + 2), (0xDC00...0xDFFF).contains(low)
                {
                    code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                    index += 6
                }
                output += Array(String(Unicode.Scalar(code).map(Character.init) ?? "\u{FFFD}").utf8)
            default: output.append(escape)  // \" \\ \/ and anything unknown: the character itself
            }
        }
        return output
    }
}
