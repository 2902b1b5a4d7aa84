/// Durations as the configuration writes them: `"250ms"`, `"5s"`, `"2m"`, `"1h"`.
public enum DurationText {
    private static let units: [(suffix: String, milliseconds: Int64)] = [
        ("ms", 1), ("s", 1000), ("m", 60_000), ("h", 3_600_000), ("d", 86_400_000),
    ]

    /// Parses a whole number followed by one of `ms`, `s`, `m`, `h`, `d`; nil for anything else,
    /// including an amount too large to count in milliseconds (`999999999999d`).
    public static func parse(_ text: String) -> Duration? {
        let digits = text.prefix(while: { $0.isASCII && $0.isNumber })
        let unit = text.dropFirst(digits.count)
        guard !digits.isEmpty, digits.count <= 12, let amount = Int64(digits),
            let scale = units.first(where: { $0.suffix == unit })?.milliseconds
        else { return nil }
        let (milliseconds, overflow) = amount.multipliedReportingOverflow(by: scale)
        return overflow ? nil : .milliseconds(milliseconds)
    }

    /// The shortest exact text for `duration`, in the largest unit that divides it.
    public static func format(_ duration: Duration) -> String {
        let milliseconds = duration.milliseconds
        for (suffix, scale) in units.reversed() where milliseconds != 0 && milliseconds % scale == 0 {
            return "\(milliseconds / scale)\(suffix)"
        }
        return "\(milliseconds)ms"
    }
}

extension Duration {
    /// Whole milliseconds in this duration.
    package var milliseconds: Int64 {
        components.seconds * 1000 + components.attoseconds / 1_000_000_000_000_000
    }

    /// This duration in seconds, as a floating-point number.
    package var seconds: Double { Double(milliseconds) / 1000 }
}
