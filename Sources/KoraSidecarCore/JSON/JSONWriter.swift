/// Writes JSON text: compact for the wire, indented for people (`check-config`).
package struct JSONWriter {
    private var output: [UInt8] = []
    private let indent: Bool

    private init(indent: Bool) {
        self.indent = indent
        output.reserveCapacity(512)
    }

    /// The compact UTF-8 encoding of `value`.
    package static func encode(_ value: JSONValue) -> [UInt8] {
        var writer = JSONWriter(indent: false)
        writer.write(value, level: 0)
        return writer.output
    }

    /// An indented rendering of `value`, two spaces a level.
    package static func prettyString(_ value: JSONValue) -> String {
        var writer = JSONWriter(indent: true)
        writer.write(value, level: 0)
        return String(decoding: writer.output, as: UTF8.self)
    }

    /// Appends `string` as a quoted, escaped JSON string to `output`.
    package static func appendString(_ string: String, to output: inout [UInt8]) {
        output.append(UInt8(ascii: "\""))
        defer { output.append(UInt8(ascii: "\"")) }
        // Most strings need no escape: copied whole.
        guard string.utf8.contains(where: { $0 < 0x20 || $0 == UInt8(ascii: "\"") || $0 == UInt8(ascii: "\\") }) else {
            output.append(contentsOf: string.utf8)
            return
        }
        for byte in string.utf8 {
            switch byte {
            case UInt8(ascii: "\""): output.append(contentsOf: [0x5C, 0x22])
            case UInt8(ascii: "\\"): output.append(contentsOf: [0x5C, 0x5C])
            case 0x0A: output.append(contentsOf: [0x5C, UInt8(ascii: "n")])
            case 0x0D: output.append(contentsOf: [0x5C, UInt8(ascii: "r")])
            case 0x09: output.append(contentsOf: [0x5C, UInt8(ascii: "t")])
            case 0..<0x20:
                output.append(contentsOf: Array("\\u00".utf8))
                output.append(Hex.digits[Int(byte >> 4)])
                output.append(Hex.digits[Int(byte & 0x0F)])
            default: output.append(byte)
            }
        }
    }

    private mutating func newline(_ level: Int) {
        guard indent else { return }
        output.append(0x0A)
        output.append(contentsOf: repeatElement(UInt8(ascii: " "), count: level * 2))
    }

    private mutating func write(_ value: JSONValue, level: Int) {
        switch value {
        case .null: output.append(contentsOf: "null".utf8)
        case .bool(let b): output.append(contentsOf: (b ? "true" : "false").utf8)
        case .number(let n): output.append(contentsOf: n.utf8)
        case .string(let s): Self.appendString(s, to: &output)
        case .array(let elements):
            output.append(UInt8(ascii: "["))
            for (i, element) in elements.enumerated() {
                if i > 0 { output.append(UInt8(ascii: ",")) }
                newline(level + 1)
                write(element, level: level + 1)
            }
            if !elements.isEmpty { newline(level) }
            output.append(UInt8(ascii: "]"))
        case .object(let members):
            output.append(UInt8(ascii: "{"))
            for (i, member) in members.enumerated() {
                if i > 0 { output.append(UInt8(ascii: ",")) }
                newline(level + 1)
                Self.appendString(member.key, to: &output)
                output.append(UInt8(ascii: ":"))
                if indent { output.append(UInt8(ascii: " ")) }
                write(member.value, level: level + 1)
            }
            if !members.isEmpty { newline(level) }
            output.append(UInt8(ascii: "}"))
        }
    }
}
