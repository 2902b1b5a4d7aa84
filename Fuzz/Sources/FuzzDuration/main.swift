import KoraSidecar

/// Input: a duration text and, after a newline, an `allow` pattern. A parsed duration formats back
/// to a text that parses to the same duration.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ start: UnsafePointer<UInt8>, _ count: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: start, count: count))
    let split = bytes.firstIndex(of: 0x0A) ?? bytes.endIndex
    let text = String(decoding: bytes[..<split], as: UTF8.self)
    if let duration = DurationText.parse(text) {
        precondition(DurationText.parse(DurationText.format(duration)) == duration, "\(text) does not round-trip")
    }
    _ = AllowPattern(String(decoding: bytes[split...].dropFirst(), as: UTF8.self))
    return 0
}
