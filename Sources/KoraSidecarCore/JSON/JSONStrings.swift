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
            guard let (decoded, next) = escape(in: bytes, at: index) else {
                output.append(byte)  // a broken escape stays as it was
                continue
            }
            output += decoded
            index = next
        }
        return output
    }

    /// `text` as a JSON string (quotes included) in each spelling common encoders write: non-ASCII
    /// as itself (JavaScript, Go), as `\u00e9` (Python) or `\u00E9`, each with `/` as itself or as
    /// `\/` (PHP). For finding a value in stored bytes that a query can only search, not parse.
    package static func spellings(of text: String) -> [[UInt8]] {
        // The writer's own escaping of quotes and controls; non-ASCII as itself.
        let plain = String(decoding: JSONWriter.encode(.string(text)).dropFirst().dropLast(), as: UTF8.self)
        var spellings: [[UInt8]] = []
        for uppercase in [nil, false, true] as [Bool?] {
            let spelled = uppercase.map { uppercase in
                plain.unicodeScalars.map { scalar in
                    scalar.isASCII ? String(scalar) : String(scalar).utf16.map { "\\u" + hex4($0, uppercase: uppercase) }.joined()
                }.joined()
            } ?? plain
            for text in [spelled, spelled.split(separator: "/", omittingEmptySubsequences: false).joined(separator: "\\/")] {
                let quoted = [UInt8(ascii: "\"")] + Array(text.utf8) + [UInt8(ascii: "\"")]
                if !spellings.contains(quoted) { spellings.append(quoted) }
            }
        }
        return spellings
    }

    private static func hex4(_ unit: UInt16, uppercase: Bool) -> String {
        let digits = String(unit, radix: 16, uppercase: uppercase)
        return String(repeating: "0", count: 4 - digits.count) + digits
    }

    /// What the escape at `index` (the byte after its backslash) stands for, in UTF-8, and where the
    /// text after it starts; nil when it is none. RFC 8259's grammar allows a lone surrogate, which
    /// JSON.stringify and json.dumps write for a string holding one: it is read as U+FFFD, as most
    /// parsers do, and a high one followed by an escape that is not its pair leaves that to be read next.
    package static func escape(in bytes: [UInt8], at index: Int) -> (bytes: [UInt8], next: Int)? {
        guard index < bytes.count else { return nil }
        switch bytes[index] {
        case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): return ([bytes[index]], index + 1)
        case UInt8(ascii: "b"): return ([0x08], index + 1)
        case UInt8(ascii: "f"): return ([0x0C], index + 1)
        case UInt8(ascii: "n"): return ([0x0A], index + 1)
        case UInt8(ascii: "r"): return ([0x0D], index + 1)
        case UInt8(ascii: "t"): return ([0x09], index + 1)
        case UInt8(ascii: "u"):
            guard var code = Hex.value4(bytes, at: index + 1) else { return nil }
            var next = index + 5
            if (0xD800...0xDBFF).contains(code), next + 1 < bytes.count, bytes[next] == UInt8(ascii: "\\"), bytes[next + 1] == UInt8(ascii: "u"),
                let low = Hex.value4(bytes, at: next + 2), (0xDC00...0xDFFF).contains(low)
            {
                code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                next += 6
            }
            // A lone surrogate is no scalar: U+FFFD.
            return (Array(String(Character(Unicode.Scalar(code) ?? "\u{FFFD}")).utf8), next)
        default:
            return nil
        }
    }
}
