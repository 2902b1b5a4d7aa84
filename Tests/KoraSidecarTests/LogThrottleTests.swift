import Logging
import NIOConcurrencyHelpers
import Testing

@testable import KoraSidecar

@Suite("Log throttle")
struct LogThrottleTests {
    @Test func oneLineAnIntervalSayingHowManyWereHeldBack() {
        let start = ContinuousClock.now
        let now = NIOLockedValueBox(start)
        let throttle = LogThrottle(every: .seconds(1), now: { now.withLockedValue { $0 } })
        var lines: [Logger.Metadata] = []
        for index in 0..<5 { throttle.log(["n": "\(index)"]) { lines.append($0) } }
        #expect(lines == [["n": "0"]])

        now.withLockedValue { $0 = start + .milliseconds(999) }
        throttle.log(["n": "5"]) { lines.append($0) }
        #expect(lines.count == 1)

        now.withLockedValue { $0 = start + .seconds(1) }
        throttle.log(["n": "6"]) { lines.append($0) }
        #expect(lines.last == ["n": "6", "log.held": "5"])

        // Nothing held back since: no count.
        now.withLockedValue { $0 = start + .seconds(5) }
        throttle.log(["n": "7"]) { lines.append($0) }
        #expect(lines.last == ["n": "7"])
        #expect(lines.count == 3)
    }
}
