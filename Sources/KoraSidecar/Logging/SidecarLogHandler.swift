#if canImport(Glibc)
import KoraSidecarCore
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import Logging

/// Writes one log line per event to standard error: a JSON object (the default) or `key=value` text.
/// Messages are static; what varies is in the metadata.
package struct SidecarLogHandler: LogHandler {
    package var metadata: Logger.Metadata = [:]
    package var logLevel: Logger.Level
    private let label: String
    private let format: LogFormat

    package init(label: String, level: Logger.Level, format: LogFormat) {
        self.label = label
        self.logLevel = level
        self.format = format
    }

    package subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    package func log(event: LogEvent) {
        var merged = metadata
        if let extra = event.metadata { merged.merge(extra) { $1 } }
        let time = UnixTime.now().iso8601Milliseconds
        var line: [UInt8] = []
        line.reserveCapacity(320)
        switch format {
        case .json:
            // Written straight into the line: this runs once per webhook.
            func member(_ key: String, _ value: String) {
                line.append(line.isEmpty ? UInt8(ascii: "{") : UInt8(ascii: ","))
                JSONWriter.appendString(key, to: &line)
                line.append(UInt8(ascii: ":"))
                JSONWriter.appendString(value, to: &line)
            }
            member("time", time)
            member("level", event.level.rawValue)
            member("message", event.message.description)
            member("logger", label)
            for (key, value) in merged.sorted(by: { $0.key < $1.key }) {
                switch value {
                case .string(let text): member(key, text)
                case .stringConvertible(let text): member(key, text.description)
                case .array, .dictionary:
                    line.append(UInt8(ascii: ","))
                    JSONWriter.appendString(key, to: &line)
                    line.append(UInt8(ascii: ":"))
                    line.append(contentsOf: JSONWriter.encode(Self.json(value)))
                }
            }
            line.append(UInt8(ascii: "}"))
        case .text:
            let fields = merged.sorted(by: { $0.key < $1.key }).map { "\($0.key)=\(Self.escaped("\($0.value)"))" }.joined(separator: " ")
            line.append(contentsOf: "\(time) \(event.level.rawValue.uppercased()) \(event.message)".utf8)
            if !fields.isEmpty { line.append(contentsOf: (" " + fields).utf8) }
        }
        line.append(0x0A)
        // One write(2) per line, so that lines from concurrent tasks never interleave.
        line.withUnsafeBufferPointer { buffer in _ = write(2, buffer.baseAddress, buffer.count) }
    }

    /// A metadata value as one token of a text line: control characters escaped, so that a value
    /// taken from a request (an event id, a type) can never start a forged log line.
    static func escaped(_ value: String) -> String {
        guard value.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7F }) else { return value }
        var output = ""
        for scalar in value.unicodeScalars {
            switch scalar {
            case "\n": output += "\\n"
            case "\r": output += "\\r"
            case "\t": output += "\\t"
            case _ where scalar.value < 0x20 || scalar.value == 0x7F: output += "\\u{\(String(scalar.value, radix: 16))}"
            default: output.unicodeScalars.append(scalar)
            }
        }
        return output
    }

    private static func json(_ value: Logger.MetadataValue) -> JSONValue {
        switch value {
        case .string(let s): .string(s)
        case .stringConvertible(let s): .string(s.description)
        case .array(let values): .array(values.map(json))
        case .dictionary(let values): .object(values.sorted { $0.key < $1.key }.map { .init($0.key, json($0.value)) })
        }
    }
}
