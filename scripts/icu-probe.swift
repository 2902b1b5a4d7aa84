// Calls into ICU through full Foundation, for scripts/check-icu-subset: built once with the toolchain's
// whole ICU data and once with scripts/icu-subset's, the lines it prints must be the same. They cover
// what postgres-nio uses (String(format:)) and what any code running in the sidecar could reach
// without naming a locale: the current and the POSIX locale, time zones, calendars, dates and numbers
// formatted, text compared and cased. A locale the subset leaves out must still work (as root).
import Foundation

let instant = Date(timeIntervalSince1970: 1_736_937_000.25)  // 2025-01-15T10:30:00.250Z
var lines: [String] = []
func line(_ label: String, _ value: @autoclosure () -> String) { lines.append("\(label): \(value())") }

line("format", String(format: "%02x%04x %d %.3f %@", 10, 0x2c, -42, 3.14159, "text"))
line("posix", {
    let formatter = DateFormatter()
    formatter.locale = Locale(identifier: "en_US_POSIX")
    formatter.timeZone = TimeZone(identifier: "UTC")
    formatter.dateFormat = "yyyy-MM-dd'T'HH:mm:ss.SSSZZZZZ EEE MMM"
    return formatter.string(from: instant)
}())
line("iso8601", ISO8601DateFormatter().string(from: instant))
line("iso8601 style", instant.formatted(.iso8601))
for zone in ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"] {
    let timeZone = TimeZone(identifier: zone)
    line("zone \(zone)", "\(timeZone?.identifier ?? "nil") \(timeZone?.secondsFromGMT(for: instant) ?? -1) \(timeZone?.isDaylightSavingTime(for: instant) ?? false)")
}
line("gregorian", {
    var calendar = Calendar(identifier: .gregorian)
    calendar.timeZone = TimeZone(identifier: "Europe/Berlin")!
    let parts = calendar.dateComponents([.year, .month, .day, .hour, .weekday, .weekOfYear], from: instant)
    return "\(parts.year!) \(parts.month!) \(parts.day!) \(parts.hour!) \(parts.weekday!) \(parts.weekOfYear!)"
}())
for identifier in ["en_US", "en_US_POSIX", "en"] {
    let locale = Locale(identifier: identifier)
    let number = NumberFormatter()
    number.locale = locale
    number.numberStyle = .decimal
    let date = DateFormatter()
    date.locale = locale
    date.timeZone = TimeZone(identifier: "UTC")
    date.dateStyle = .full
    date.timeStyle = .long
    line("locale \(identifier)", "\(number.string(from: 1_234_567.891) ?? "nil") | \(date.string(from: instant)) | \(locale.identifier)")
}
line("current", "\(Locale.current.identifier) \(TimeZone.current.identifier)")
line("compare", "\("straße".caseInsensitiveCompare("STRASSE").rawValue) \("a".localizedStandardCompare("B").rawValue) \("Éclair".folding(options: [.diacriticInsensitive, .caseInsensitive], locale: nil))")
line("case", "\("istanbul".uppercased()) \("ǅ".lowercased()) \("ﬁ".capitalized)")
line("decimal", "\(Decimal(string: "12345.6789")!) \(Decimal(string: "-0.000001")!)")
line("data", "\(Data("kora".utf8).base64EncodedString()) \(UUID(uuidString: "E621E1F8-C36C-495A-93FC-0C247A3E6E5F")!.uuidString)")
line("json", String(decoding: try! JSONSerialization.data(withJSONObject: ["a": [1, 2.5, "é"]], options: [.sortedKeys]), as: UTF8.self))
print(lines.joined(separator: "\n"))

// Left out of the subset: formatted as root would, without failing.
let german = NumberFormatter()
german.locale = Locale(identifier: "de_DE")
german.numberStyle = .currency
let japanese = DateFormatter()
japanese.locale = Locale(identifier: "ja_JP")
japanese.dateStyle = .full
let other: [String?] = [
    german.string(from: 1234.5), japanese.string(from: instant), "漢字かな交じり文".capitalized,
    String(data: Data([0x82, 0xA0, 0x41]), encoding: .shiftJIS), String(data: Data([0xE9]), encoding: .isoLatin1),
]
FileHandle.standardError.write(Data("other locales: \(other.map { $0 ?? "nil" })\n".utf8))
