/// A parsed JSON value.
///
/// Numbers keep their source text so that a score such as `96.3` is written back exactly as Kora
/// sent it, and object members keep their order and the byte range of their value in the input.
public enum JSONValue: Sendable, Equatable {
    case null
    case bool(Bool)
    case number(String)
    case string(String)
    case array([JSONValue])
    case object([JSONMember])

    /// The value of `key` in an object (the last one when a key repeats, as `JSON.parse` does).
    package subscript(key: String) -> JSONValue? {
        guard case .object(let members) = self else { return nil }
        return members.last(where: { $0.key == key })?.value
    }

    /// The member named `key` in an object, with its raw byte range.
    package func member(_ key: String) -> JSONMember? {
        guard case .object(let members) = self else { return nil }
        return members.last(where: { $0.key == key })
    }

    /// The string, or a number's text; nil for anything else.
    package var text: String? {
        switch self {
        case .string(let s): s
        case .number(let n): n
        default: nil
        }
    }

    /// A short name of the kind of value, for error messages.
    var kindName: String {
        switch self {
        case .null: "null"
        case .bool: "a boolean"
        case .number: "a number"
        case .string: "a string"
        case .array: "an array"
        case .object: "an object"
        }
    }
}

/// One member of a JSON object.
public struct JSONMember: Sendable, Equatable {
    /// The member's key.
    package var key: String
    /// The member's value.
    package var value: JSONValue
    /// Where the value's text stands in the parsed input; empty for values built in code.
    package var rawRange: Range<Int>

    /// Creates a member built in code.
    package init(_ key: String, _ value: JSONValue, rawRange: Range<Int> = 0..<0) {
        self.key = key
        self.value = value
        self.rawRange = rawRange
    }

    public static func == (lhs: JSONMember, rhs: JSONMember) -> Bool {
        lhs.key == rhs.key && lhs.value == rhs.value
    }
}

extension JSONValue: ExpressibleByStringLiteral, ExpressibleByBooleanLiteral, ExpressibleByIntegerLiteral,
    ExpressibleByArrayLiteral, ExpressibleByDictionaryLiteral, ExpressibleByNilLiteral
{
    public init(stringLiteral value: String) { self = .string(value) }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
    public init(integerLiteral value: Int) { self = .number(String(value)) }
    public init(arrayLiteral elements: JSONValue...) { self = .array(elements) }
    public init(dictionaryLiteral elements: (String, JSONValue)...) {
        self = .object(elements.map { JSONMember($0.0, $0.1) })
    }
    public init(nilLiteral: ()) { self = .null }
}

extension JSONValue {
    /// A number value from an integer.
    package static func int(_ value: Int) -> JSONValue { .number(String(value)) }
    /// A string value, or null when absent.
    package static func optional(_ value: String?) -> JSONValue { value.map(JSONValue.string) ?? .null }
}
