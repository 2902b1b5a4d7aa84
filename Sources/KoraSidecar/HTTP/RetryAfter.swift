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
    /// Parses `Retry-After`: delay-seconds or an HTTP date (IMF-fixdate, as RFC 9110 requires
    /// senders to use); a date in the past is a wait of zero.
    static func parse(_ value: String, now: UnixTime) -> Duration? {
        let text = String(value.trimmingSpaces)
        if !text.isEmpty, text.utf8.count <= 10, text.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }), let seconds = Int64(text) {
            return .seconds(seconds)
        }
        guard let date = parseHTTPDate(text) else { return nil }
        return .milliseconds(max(0, date.milliseconds - now.milliseconds))
    }

    /// Parses `Sun, 06 Nov 1994 08:49:37 GMT`. The year has four digits, as IMF-fixdate writes it:
    /// a longer one (from any service answering a delivery) would overflow the arithmetic.
    static func parseHTTPDate(_ text: String) -> UnixTime? {
        let parts = text.split(separator: " ")
        guard parts.count == 6, parts[5] == "GMT", parts[3].utf8.count == 4, let day = Int32(parts[1]),
            let month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"].firstIndex(of: String(parts[2])),
            let year = Int32(parts[3])
        else { return nil }
        let clock = parts[4].split(separator: ":")
        guard clock.count == 3, let hour = Int32(clock[0]), let minute = Int32(clock[1]), let second = Int32(clock[2]),
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
