import Testing

@testable import KoraSidecar
@testable import KoraSidecarCore
@testable import KoraSidecarTesting
@testable import KoraSimulator

@Suite("JSON")
struct JSONTests {
    func parse(_ text: String, strict: Bool = false) throws -> JSONValue {
        try JSONParser.parse(Array(text.utf8), rejectDuplicateKeys: strict)
    }

    @Test func parsesEveryKindOfValue() throws {
        let value = try parse(#" {"a": [1, -2.5e3, true, false, null, "x\n\u00e9\ud83d\ude00"], "b": {}} "#)
        #expect(value["a"] == .array([.number("1"), .number("-2.5e3"), .bool(true), .bool(false), .null, .string("x\né😀")]))
        #expect(value["b"] == .object([]))
    }

    @Test func numbersKeepTheirText() throws {
        let value = try parse(#"{"score": 96.30}"#)
        #expect(String(decoding: JSONWriter.encode(value), as: UTF8.self) == #"{"score":96.30}"#)
    }

    @Test func membersKnowTheirRawBytes() throws {
        let text = #"{"data" :  { "b": 1,  "a": [ 2 ] } , "x": 1}"#
        let member = try #require(try parse(text).member("data"))
        #expect(String(decoding: Array(text.utf8)[member.rawRange], as: UTF8.self) == #"{ "b": 1,  "a": [ 2 ] }"#)
    }

    @Test(arguments: [
        "", "{", "[1,]", #"{"a":1,}"#, "01", "1.", "-", "tru", #""abc"#, #"{"a" 1}"#, "[1] x", #""\x""#, #""\ud800\u12""#,
        "\"\u{01}\"", "nul", "{1:2}",
    ])
    func rejectsInvalidDocuments(text: String) {
        #expect(throws: JSONParseError.self) { try parse(text) }
    }

    @Test func aLoneSurrogateIsReadAsTheReplacementCharacter() throws {
        // What JSON.stringify and json.dumps write for a string holding one: valid JSON, not refused.
        #expect(try parse(#""a\ud800b""#) == .string("a\u{FFFD}b"))
        #expect(try parse(#""\udc00""#) == .string("\u{FFFD}"))
        #expect(try parse(#""\ud800""#) == .string("\u{FFFD}"))
        // A high surrogate followed by an escape that is not its pair: each read on its own.
        #expect(try parse(#""\ud800\u0041""#) == .string("\u{FFFD}A"))
        #expect(try parse(#""\ud800\ud83d\ude00""#) == .string("\u{FFFD}😀"))
    }

    @Test func stringsAreReadAsTheySayInTextThatDoesNotParse() {
        let text = #"{"a": "x\u00e9\/\"q\ud83d\ude00\ud800", "b": [1, "\u12"#
        #expect(String(decoding: JSONStrings.unescaped(Array(text.utf8)), as: UTF8.self) == #"{"a": "xé/"q😀\#u{FFFD}", "b": [1, "\u12"#)
    }

    @Test func aStringIsSpeltAsCommonEncodersSpellIt() {
        let spelt = JSONStrings.spellings(of: "jö/😀").map { String(decoding: $0, as: UTF8.self) }
        #expect(spelt == [
            #""jö/😀""#, #""jö\/😀""#, #""j\u00f6/\ud83d\ude00""#, #""j\u00f6\/\ud83d\ude00""#, #""j\u00F6/\uD83D\uDE00""#, #""j\u00F6\/\uD83D\uDE00""#,
        ])
        #expect(JSONStrings.spellings(of: "ver_1") == [Array(#""ver_1""#.utf8)])
    }

    @Test func rejectsInvalidUTF8() {
        #expect(throws: JSONParseError.self) { try JSONParser.parse([0x22, 0xFF, 0xFE, 0x22]) }
    }

    @Test func limitsNesting() throws {
        let deep = String(repeating: "[", count: 65) + String(repeating: "]", count: 65)
        #expect(throws: JSONParseError.self) { try parse(deep) }
        let allowed = String(repeating: "[", count: 64) + String(repeating: "]", count: 64)
        _ = try parse(allowed)
        let hostile = String(repeating: "[", count: 100_000)
        #expect(throws: JSONParseError.self) { try parse(hostile) }
    }

    @Test func duplicateKeysLastWinsUnlessStrict() throws {
        #expect(try parse(#"{"a":1,"a":2}"#)["a"] == .number("2"))
        #expect(throws: JSONParseError.self) { try parse(#"{"a":1,"a":2}"#, strict: true) }
    }

    @Test func writerEscapesStrings() throws {
        let value: JSONValue = ["k": .string("q\"b\\n\n\t\u{01}é")]
        let text = String(decoding: JSONWriter.encode(value), as: UTF8.self)
        #expect(text == #"{"k":"q\"b\\n\n\t\u0001é"}"#)
        #expect(try parse(text) == value)
    }

    @Test func hexRoundTrips() {
        let bytes: [UInt8] = [0, 1, 0xAB, 0xFF]
        #expect(Hex.encode(bytes) == "0001abff")
        #expect(Hex.decode(Substring("0001ABff").utf8) == bytes)
        #expect(Hex.decode(Substring("0g").utf8) == nil)
        #expect(Hex.decode(Substring("abc").utf8) == nil)
    }

    @Test func textLogValuesCannotForgeLines() {
        #expect(SidecarLogHandler.escaped("evt_1") == "evt_1")
        #expect(SidecarLogHandler.escaped("a\n2026-01-01 ERROR forged") == "a\\n2026-01-01 ERROR forged")
        #expect(!SidecarLogHandler.escaped("x\r\ny\u{1B}[31m").contains(where: { $0.isNewline || $0 == "\u{1B}" }))
    }
}
