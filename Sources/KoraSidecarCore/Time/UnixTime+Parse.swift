#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

extension UnixTime {
    /// A time as an operator writes it on a command line or in a query, or as an API states one: an
    /// ISO 8601 date (`2026-11-30`) or an RFC 3339 time (`2026-11-30T09:15:00Z`, `…T09:15:00.250Z`,
    /// `…T10:15:00.123456+01:00`: any fraction, read to the millisecond; any offset), or a duration
    /// before `now` (`90m`, `24h`, `7d`).
    package static func parse(_ text: String, now: UnixTime) -> UnixTime? {
        if let duration = DurationText.parse(text) { return UnixTime(milliseconds: now.milliseconds - duration.milliseconds) }
        return parse(dateOrTime: text)
    }

    /// An ISO 8601 date or an RFC 3339 time, as ``parse(_:now:)`` reads them, and nothing else: for
    /// times stated in data (an event's `timestamp`), where `90m` is no time at all.
    package static func parse(dateOrTime text: String) -> UnixTime? {
        let bytes = Array(text.utf8)
        func number(_ range: Range<Int>) -> Int32? {
            guard range.upperBound <= bytes.count, bytes[range].allSatisfy(\.isASCIIDigit) else { return nil }
            return Int32(String(decoding: bytes[range], as: UTF8.self))
        }
        guard bytes.count >= 10, bytes[4] == UInt8(ascii: "-"), bytes[7] == UInt8(ascii: "-"),
            let year = number(0..<4), let month = number(5..<7), let day = number(8..<10), (1...12).contains(month),
            (1...daysIn(month: month, of: year)).contains(day)
        else { return nil }
        var fields = tm()
        fields.tm_year = year - 1900
        fields.tm_mon = month - 1
        fields.tm_mday = day
        var milliseconds: Int64 = 0
        var offsetSeconds: Int64 = 0
        if bytes.count > 10 {
            guard bytes.count >= 20, [UInt8(ascii: "T"), UInt8(ascii: "t"), UInt8(ascii: " ")].contains(bytes[10]),
                bytes[13] == UInt8(ascii: ":"), bytes[16] == UInt8(ascii: ":"),
                let hour = number(11..<13), let minute = number(14..<16), let second = number(17..<19), hour < 24, minute < 60, second < 61
            else { return nil }
            fields.tm_hour = hour
            fields.tm_min = minute
            fields.tm_sec = second
            var index = 19
            if bytes[index] == UInt8(ascii: ".") {
                let digits = bytes[(index + 1)...].prefix(while: \.isASCIIDigit)
                guard !digits.isEmpty else { return nil }
                // The first three digits are the milliseconds; finer ones are dropped.
                for (place, digit) in digits.prefix(3).enumerated() { milliseconds += Int64(digit - 0x30) * [100, 10, 1][place] }
                index += 1 + digits.count
            }
            guard index < bytes.count else { return nil }
            switch bytes[index] {
            case UInt8(ascii: "Z"), UInt8(ascii: "z"):
                guard index + 1 == bytes.count else { return nil }
            case UInt8(ascii: "+"), UInt8(ascii: "-"):
                guard bytes.count == index + 6, bytes[index + 3] == UInt8(ascii: ":"), let hours = number((index + 1)..<(index + 3)),
                    let minutes = number((index + 4)..<(index + 6)), hours < 24, minutes < 60
                else { return nil }
                offsetSeconds = Int64(hours * 3600 + minutes * 60) * (bytes[index] == UInt8(ascii: "-") ? -1 : 1)
            default:
                return nil
            }
        }
        let seconds = Int64(timegm(&fields)) - offsetSeconds
        return UnixTime(milliseconds: seconds * 1000 + milliseconds)
    }

    /// The days of `month` (1…12) in `year`: a 31 February is no date (`timegm` would make it 3 March).
    private static func daysIn(month: Int32, of year: Int32) -> Int32 {
        switch month {
        case 2: year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) ? 29 : 28
        case 4, 6, 9, 11: 30
        default: 31
        }
    }
}
