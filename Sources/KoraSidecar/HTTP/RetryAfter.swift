import KoraSidecarCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// `Retry-After`, as Kora sends it to the proxy and as a service may send it to a delivery.
enum RetryAfter {
    /// Parses `Retry-After`: delay-seconds or an HTTP date in any of the three forms RFC 9110 has
    /// recipients read; a date in the past is a wait of zero. Seconds beyond ten digits are a wait
    /// longer than any the sidecar keeps, not none.
    static func parse(_ value: String, now: UnixTime) -> Duration? {
        let text = String(value.trimmingSpaces)
        if !text.isEmpty, text.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) {
            return .seconds(text.utf8.count <= 10 ? Int64(text)! : 9_999_999_999)
        }
        guard let date = parseHTTPDate(text, now: now) else { return nil }
        return .milliseconds(max(0, date.milliseconds - now.milliseconds))
    }

    /// Parses `Sun, 06 Nov 1994 08:49:37 GMT` (IMF-fixdate, what senders must write), and the two
    /// obsolete forms `Sunday, 06-Nov-94 08:49:37 GMT` (RFC 850: a year that would be more than 50
    /// years after `now` is the century before) and `Sun Nov  6 08:49:37 1994` (asctime). A year has
    /// at most four digits: a longer one (from any service answering a delivery) would overflow.
    static func parseHTTPDate(_ text: String, now: UnixTime = .now()) -> UnixTime? {
        let parts = text.split(separator: " ")
        switch parts.count {
        case 6 where parts[5] == "GMT" && parts[3].utf8.count == 4:
            return time(day: parts[1], month: parts[2], year: Int32(parts[3]), clock: parts[4])
        case 4 where parts[3] == "GMT":
            let date = parts[1].split(separator: "-")
            guard date.count == 3, date[2].utf8.count == 2, let short = Int32(date[2]) else { return nil }
            let thisYear = Int32(1970 + now.milliseconds / 31_556_952_000)
            var year = thisYear - thisYear % 100 + short
            if year > thisYear + 50 { year -= 100 }
            return time(day: date[0], month: date[1], year: year, clock: parts[2])
        case 5 where parts[4].utf8.count == 4:
            return time(day: parts[2], month: parts[1], year: Int32(parts[4]), clock: parts[3])
        default:
            return nil
        }
    }

    private static func time(day: Substring, month: Substring, year: Int32?, clock: Substring) -> UnixTime? {
        let clock = clock.split(separator: ":")
        guard let year, (0...9999).contains(year), let day = Int32(day),
            let month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"].firstIndex(of: String(month)),
            clock.count == 3, let hour = Int32(clock[0]), let minute = Int32(clock[1]), let second = Int32(clock[2]),
            (1...31).contains(day), (0...23).contains(hour), (0...59).contains(minute), (0...60).contains(second)
        else { return nil }
        var fields = tm()
        fields.tm_year = year - 1900
        fields.tm_mon = Int32(month)
        fields.tm_mday = day
        fields.tm_hour = hour
        fields.tm_min = minute
        fields.tm_sec = second
        let seconds = timegm(&fields)
        guard seconds >= 0 else { return nil }
        return UnixTime(milliseconds: Int64(seconds) * 1000)
    }
}
