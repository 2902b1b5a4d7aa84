#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

extension UnixTime {
    /// A time as an operator writes it on a command line or in a query: an ISO 8601 date or UTC
    /// time (`2026-11-30`, `2026-11-30T09:15:00Z`, `…T09:15:00.250Z`), or a duration before `now`
    /// (`90m`, `24h`, `7d`).
    package static func parse(_ text: String, now: UnixTime) -> UnixTime? {
        if let duration = DurationText.parse(text) { return UnixTime(milliseconds: now.milliseconds - duration.milliseconds) }
        let bytes = Array(text.utf8)
        func number(_ range: Range<Int>) -> Int32? {
            guard range.upperBound <= bytes.count, bytes[range].allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) else { return nil }
            return Int32(String(decoding: bytes[range], as: UTF8.self))
        }
        guard bytes.count >= 10, bytes[4] == UInt8(ascii: "-"), bytes[7] == UInt8(ascii: "-"),
            let year = number(0..<4), let month = number(5..<7), let day = number(8..<10), (1...12).contains(month), (1...31).contains(day)
        else { return nil }
        var fields = tm()
        fields.tm_year = year - 1900
        fields.tm_mon = month - 1
        fields.tm_mday = day
        var milliseconds: Int64 = 0
        if bytes.count > 10 {
            guard bytes.count >= 20, bytes[10] == UInt8(ascii: "T"), bytes[13] == UInt8(ascii: ":"), bytes[16] == UInt8(ascii: ":"),
                bytes.last == UInt8(ascii: "Z"), let hour = number(11..<13), let minute = number(14..<16), let second = number(17..<19),
                hour < 24, minute < 60, second < 61
            else { return nil }
            fields.tm_hour = hour
            fields.tm_min = minute
            fields.tm_sec = second
            if bytes.count > 20 {
                guard bytes[19] == UInt8(ascii: "."), bytes.count <= 24, let fraction = number(20..<(bytes.count - 1)) else { return nil }
                milliseconds = Int64(fraction) * [1, 100, 10, 1][bytes.count - 21]
            }
        }
        let seconds = timegm(&fields)
        return UnixTime(milliseconds: Int64(seconds) * 1000 + milliseconds)
    }
}
